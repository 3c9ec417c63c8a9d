//! The `ferry` binary as orchestrators use it: a real daemon on a real (loopback) socket.
use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn health_answers_json_and_unreachable_gateway_is_a_clear_error() {
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["gateway", "--listen", &addr, "--state-dir"])
            .arg(state.path())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["health", "--json", "--gateway", &addr])
            .output()
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["api"], "v1");

    let dead = format!("127.0.0.1:{}", free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["health", "--json", "--gateway", &dead])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("connecting to gateway"),
        "{v}"
    );
}
