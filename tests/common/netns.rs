//! Private test networks: two network namespaces joined by a veth pair, and a way to open
//! sockets inside one of them from a test thread.

use std::process::Command;

/// Two network namespaces joined by a veth pair with a private /30, removed on drop (also
/// when the test fails).
pub struct Netns {
    /// The client's namespace.
    pub client: String,
    /// The server's namespace.
    pub server: String,
    /// The server's end of the veth pair (in `server`).
    pub server_if: String,
}

/// The /30 inside the namespaces: the client's and the server's address.
pub const CLIENT_ADDR: &str = "10.254.77.1";
pub const SERVER_ADDR: &str = "10.254.77.2";

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn new() -> Netns {
        let tag = std::process::id() % 100_000;
        let ns = Netns {
            client: format!("awdt{tag}c"),
            server: format!("awdt{tag}s"),
            server_if: format!("awv{tag}s"),
        };
        let client_if = format!("awv{tag}c");
        // Leftovers of an earlier run with the same pid.
        let _ = Command::new("ip")
            .args(["netns", "del", &ns.client])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &ns.server])
            .output();
        ip(&["netns", "add", &ns.client]);
        ip(&["netns", "add", &ns.server]);
        ip(&[
            "link",
            "add",
            &client_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.server_if,
        ]);
        ip(&["link", "set", &client_if, "netns", &ns.client]);
        ip(&["link", "set", &ns.server_if, "netns", &ns.server]);
        for (n, dev, addr) in [
            (&ns.client, &client_if, CLIENT_ADDR),
            (&ns.server, &ns.server_if, SERVER_ADDR),
        ] {
            ip(&["-n", n, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", n, "link", "set", dev, "up"]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// The server's host vanishes: its link goes down, nothing is sent, no FIN, no RST.
    pub fn cut(&self) {
        ip(&["-n", &self.server, "link", "set", &self.server_if, "down"]);
    }

    /// The link comes back.
    pub fn heal(&self) {
        ip(&["-n", &self.server, "link", "set", &self.server_if, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and so the pair.
        for n in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs `f` on a thread that has entered the network namespace `ns`: sockets it creates live
/// there (and may be used from any thread afterwards).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
            // SAFETY: setns(2) on a valid namespace fd; it changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}
