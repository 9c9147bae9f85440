//! `awd`: the host daemon. Everything lives in the library; see [`awd::cli`].

fn main() -> std::process::ExitCode {
    awd::cli::main()
}
