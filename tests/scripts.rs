//! The setup scripts README's two commands rest on.

use std::process::Command;

/// `scripts/install-deps` refuses a dynamically linked busybox with a message that says what to
/// install, before it installs anything: the guest's initramfs has no libc to run it.
#[test]
fn a_dynamic_busybox_is_refused_with_what_to_install() {
    let out = Command::new("scripts/install-deps")
        .arg("demo")
        .env("AWD_BUSYBOX", "/bin/ls")
        .output()
        .expect("run scripts/install-deps");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/bin/ls is dynamically linked") && err.contains("busybox-static"),
        "{err}"
    );
}

/// On a machine that has everything (the test suite is running, so it does), it installs
/// nothing and says nothing.
#[test]
fn with_everything_present_nothing_is_installed() {
    let out = Command::new("scripts/install-deps")
        .arg("test")
        .output()
        .expect("run scripts/install-deps");
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
