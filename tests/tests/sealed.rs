//! "Sealed" in a real lab: an eavesdropper on the underlay (a capture in the router, which
//! every packet between clouds crosses) sees neither the API token nor the container's memory
//! while a container migrates — and, so that the test can fail, the same capture in a
//! plain-HTTP lab does see both. The agents' peer APIs, over TLS, refuse plain HTTP, the
//! operator's checkpoint, and a host that is not the peer of a migration.
use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ferry_api::run::RunState;
use ferry_lab::{Lab, LabOptions, control::Party};
use ferry_tests::{agents_lab, require_root_and_tools, workspace_binary};
use serde_json::Value;

const C: &str = "10.244.1.10";
const TOOLS: &[&str] = &["ip", "criu", "tcpdump"];

/// tcpdump on every interface of the router, writing `file`; returns once it listens.
fn capture(lab: &Lab, file: &std::path::Path) -> Child {
    let mut child = Command::new("ip")
        .args(["netns", "exec"])
        .arg(lab.netns(ferry_lab::lab::ROUTER).file_name().unwrap())
        .args([
            "tcpdump", "-i", "any", "-U", "-s", "0", "-n", "-B", "65536", "-w",
        ])
        .arg(file)
        .arg("tcp")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    // tcpdump says "listening on any ..." once its socket is open (or exits on failure).
    while err.read_line(&mut line).unwrap_or(0) > 0 {
        if line.contains("listening on") {
            // Keep draining its stderr so it never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut rest = String::new();
                let _ = std::io::Read::read_to_string(&mut err, &mut rest);
                eprintln!("tcpdump: {}", rest.trim());
            });
            return child;
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("tcpdump did not start: {line}");
}

/// Stops the capture (SIGINT, by PID: our own child) once it has written everything up to now,
/// and returns what it wrote. tcpdump drops what it has not written yet when it is stopped, so
/// a sentinel is sent across the router (plain bytes to the gateway's API port, from a1) until
/// the file holds it: packets are written in order.
fn finish(lab: &Lab, mut child: Child, file: &std::path::Path) -> Vec<u8> {
    let sentinel = format!("ferry-capture-sentinel-{:016x}", rand_u64());
    let api = lab.control().unwrap().api;
    let ns = lab.netns("a1");
    ferry_tests::wait_for("the capture to catch up", Duration::from_secs(30), || {
        let s = sentinel.clone();
        let _ = ferry_overlay::netns::run_in(&ns, move || {
            use std::io::Write as _;
            std::net::TcpStream::connect_timeout(&api, Duration::from_secs(1))
                .and_then(|mut c| c.write_all(s.as_bytes()))
        });
        std::fs::read(file)
            .ok()
            .filter(|b| contains(b, sentinel.as_bytes()))
            .map(|_| ())
    });
    // SAFETY: plain kill(2) of our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait().expect("tcpdump exits");
    std::fs::read(file).expect("the capture file")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A container on a1 with a marker in its memory, migrated to b1 (another cloud) under a
/// capture in the router. Returns (the capture, the lab's token, the marker).
fn migrate_under_capture(plaintext: bool) -> (Lab, Vec<u8>, String, String) {
    let lab = agents_lab(LabOptions {
        insecure_plaintext: plaintext,
        ..LabOptions::default()
    });
    let ip: Ipv4Addr = C.parse().unwrap();
    lab.add_container("a1", ip).expect("container on a1");
    let marker = format!("ferry-memory-marker-{:016x}", rand_u64());
    let workload = workspace_binary("ferry-workload");
    lab.start_process_with_env(
        "a1",
        ip,
        &[workload.to_str().unwrap(), "serve", "--port", "7000"],
        // Repeated past two segments' worth, so that one whole copy sits inside one TCP
        // segment of the capture whatever the segmentation.
        &[("FERRY_TEST_MARKER", &marker.repeat(200))],
    )
    .expect("start the workload");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("underlay.pcap");
    let tcpdump = capture(&lab, &file);
    let out = lab
        .ferry(&["--json", "migrate", "run", "--container", C, "--to", "b1"])
        .expect("ferry migrate run");
    let report: ferry_api::run::RunReport = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report.state, RunState::Released, "{report:?}");
    assert!(report.image_bytes > 0, "{report:?}");
    eprintln!("plaintext {plaintext}: image {} bytes", report.image_bytes);
    let pcap = finish(&lab, tcpdump, &file);
    let token = std::fs::read_to_string(lab.control().unwrap().token_file)
        .unwrap()
        .trim()
        .to_owned();
    (lab, pcap, token, marker)
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn the_underlay_carries_no_token_and_no_memory_in_clear() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    // The control: in plain HTTP both cross the router in clear, so the capture would see a
    // leak.
    let (lab, pcap, token, marker) = migrate_under_capture(true);
    assert!(
        contains(&pcap, format!("Bearer {token}").as_bytes()),
        "the plain-HTTP capture ({} bytes) shows no token: the capture sees nothing",
        pcap.len()
    );
    assert!(
        contains(&pcap, marker.as_bytes()),
        "the plain-HTTP capture ({} bytes) shows no image bytes",
        pcap.len()
    );
    drop(lab);

    let (lab, pcap, token, marker) = migrate_under_capture(false);
    assert!(pcap.len() > 100_000, "the capture is {} bytes", pcap.len());
    assert!(
        !contains(&pcap, token.as_bytes()),
        "the token crossed the underlay in clear"
    );
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the container's memory crossed the underlay in clear"
    );
    eprintln!("TLS capture: {} bytes, no token, no marker", pcap.len());
    peer_apis_refuse_what_is_not_theirs(&lab);
}

/// One request to `host`'s peer API from `from`'s namespace, as `party` (`None`: plain HTTP).
fn peer_request(
    lab: &Lab,
    from: &str,
    host: &str,
    party: Option<Party<'_>>,
    path: &str,
) -> (u16, Value) {
    let cp = lab.control().unwrap();
    let addr = SocketAddr::new(
        lab.host(host).unwrap().address.into(),
        ferry_lab::lab::AGENT_API_PORT,
    );
    let token = std::fs::read_to_string(&cp.token_file)
        .unwrap()
        .trim()
        .to_owned();
    let mut req = ferry_api::transport::Request::post(path.to_owned())
        .token(token)
        .json("{}")
        .timeout(Duration::from_secs(10));
    req = match party {
        Some(p) => req.tls(cp.client_tls(p).unwrap()),
        None => req.plain(),
    };
    let r = ferry_overlay::netns::run_in(&lab.netns(from), move || req.send_blocking(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

fn peer_apis_refuse_what_is_not_theirs(lab: &Lab) {
    // The container now lives on b1; a1 was its source.
    let (s, v) = peer_request(lab, "a1", "b1", None, "/v1/images/m1");
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("tls_required")),
        "{v}"
    );
    // The operator may start workloads, not checkpoint or send images.
    let (s, v) = peer_request(lab, "gw", "b1", Some(Party::Operator), "/v1/checkpoint/m1");
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    // a1 is no longer sending anything to b1 under a migration of its own: m1 went a1 → b1,
    // but a host that is in no migration with b1 (c1, if there is one; else the gateway's
    // host) may not send images at all.
    let stranger = lab
        .topology()
        .hosts
        .iter()
        .map(|h| h.name.clone())
        .find(|n| n != "a1" && n != "b1")
        .expect("a third host");
    let (s, v) = peer_request(
        lab,
        &stranger,
        "b1",
        Some(Party::Host(&stranger)),
        "/v1/images/m1",
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no migration"),
        "{v}"
    );
    // And nobody acts as the gateway: a host checkpointing is refused.
    let (s, v) = peer_request(
        lab,
        "a1",
        "b1",
        Some(Party::Host("a1")),
        "/v1/checkpoint/m1",
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    // The container still runs on b1, untouched.
    let p = lab
        .process(C.parse().unwrap())
        .unwrap()
        .expect("the container's process");
    assert!(p.running, "{p:?}");
}
