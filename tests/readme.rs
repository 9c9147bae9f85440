//! README's configuration examples are checked by `awd check`, so they cannot rot: every
//! ```toml block, and every `awd run …` command line (with its opt_script files stood in for).

mod common;

use common::*;

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).unwrap()
}

/// The contents of every fenced block with the given info string.
fn blocks(text: &str, info: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        match (&mut cur, line.trim_start()) {
            (None, l) if l == format!("```{info}") => cur = Some(String::new()),
            (Some(b), "```") => {
                out.push(std::mem::take(b));
                cur = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn every_toml_example_checks() {
    let d = scratch("readme-toml");
    let toml = blocks(&readme(), "toml");
    assert!(toml.len() >= 5, "README has its TOML examples");
    for (i, block) in toml.iter().enumerate() {
        let path = d.path().join(format!("example{i}.toml"));
        std::fs::write(&path, block).unwrap();
        let (st, out, err) = awd_oneshot(&["check", "--config", path.to_str().unwrap()]);
        assert!(
            st.success(),
            "README TOML example {i} fails `awd check`: {err}\n{block}"
        );
        assert!(out.contains("configuration OK"), "{out}");
    }
}

#[test]
fn every_awd_run_line_checks() {
    let d = scratch("readme-run");
    let mut commands = Vec::new();
    for block in blocks(&readme(), "sh") {
        let joined = block.replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("awd run ") {
                commands.push(rest.to_owned());
            }
        }
    }
    assert!(
        commands.len() >= 6,
        "README has its awd run examples: {commands:?}"
    );
    for cmd in commands {
        let mut args = vec!["check".to_owned()];
        for word in cmd.split_whitespace() {
            // opt_script=PATH: stand in a script file with the same name.
            let word = word
                .split(',')
                .map(|kv| match kv.strip_prefix("opt_script=") {
                    Some(p) => {
                        let name = std::path::Path::new(p)
                            .file_name()
                            .unwrap()
                            .to_str()
                            .unwrap();
                        let stand_in = d.path().join(name);
                        std::fs::write(&stand_in, "quit\n").unwrap();
                        format!("opt_script={}", stand_in.display())
                    }
                    None => kv.to_owned(),
                })
                .collect::<Vec<_>>()
                .join(",");
            args.push(word);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (st, _out, err) = awd_oneshot(&refs);
        assert!(
            st.success(),
            "README's `awd run {cmd}` fails `awd check`: {err}"
        );
    }
}
