//! The set-up script is idempotent: with everything present, a second run installs nothing,
//! changes nothing on the machine, and `--check` finds nothing missing.
use std::{path::PathBuf, process::Command, time::Instant};

use ferry_tests::require_root_and_tools;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What the set-up could change: installed packages, the tools it builds, apt sources.
fn fingerprint() -> String {
    let sh = r#"
        dpkg-query -W -f='${Package} ${Version} ${Status}\n' | sort | md5sum
        stat -c '%n %s %Y' /usr/local/sbin/criu "$HOME/.cargo/bin/bpf-linker" 2>&1
        ls -l --time-style=+%s /etc/apt/sources.list.d/ 2>&1
        rustup toolchain list
        rustup default
    "#;
    let out = Command::new("bash").args(["-c", sh]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn setup_is_idempotent_and_check_finds_nothing_missing() {
    if !require_root_and_tools(&["bash", "dpkg-query", "rustup"]) {
        return;
    }
    let script = repo().join("scripts/setup.sh");
    // Bring the machine to the ready state (normally already there: the test command ran it).
    let first = Command::new("bash").arg(&script).output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );

    let before = fingerprint();
    let t = Instant::now();
    let second = Command::new("bash").arg(&script).output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let log = String::from_utf8_lossy(&second.stderr);
    for word in [
        "installing",
        "building",
        "fetching",
        "adding",
        "apt-get update",
    ] {
        assert!(!log.contains(word), "second run did work ({word}):\n{log}");
    }
    assert_eq!(before, fingerprint(), "second run changed the machine");
    eprintln!("set-up second run: {secs:.2} s");

    let check = Command::new("bash")
        .arg(&script)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "--check reports missing pieces:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn installed_criu_passes_check_on_this_kernel() {
    if !require_root_and_tools(&["criu"]) {
        return;
    }
    let out = Command::new("criu").arg("check").output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("Looks good"),
        "{text}"
    );
    let v = Command::new("criu").arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&v.stdout);
    let ver = v
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .expect("criu --version prints a Version line");
    let mut parts = ver.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!((major, minor) >= (4, 1), "criu {ver} is older than 4.1");
}
