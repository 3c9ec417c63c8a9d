//! ferry as a CNI plugin in a real lab: the real `ferry-cni` binary executed as a runtime
//! executes it (environment + network configuration on stdin, inside the lab host's
//! namespace with `nsenter --net=…`), against namespaces made with `ip netns add` (named with
//! the lab's prefix, deleted at the end), the real agents' CNI sockets and the gateway's IPAM.
use std::{
    collections::BTreeSet,
    io::Write as _,
    net::{Ipv4Addr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ferry_api::{Endpoint, IpamLease};
use ferry_lab::{Lab, LabOptions};
use ferry_tests::{CountersOnPanic, gauge, require_root_and_tools, wait_for, workspace_binary};
use serde_json::{Value, json};

/// Prints how long each phase took (figures for the report; nothing is asserted on them).
struct Phases(std::time::Instant);

impl Phases {
    fn start() -> Self {
        Self(std::time::Instant::now())
    }
    fn mark(&mut self, what: &str) {
        eprintln!("{what}: {:?}", self.0.elapsed());
        self.0 = std::time::Instant::now();
    }
}

/// Deadline of every wait (each ends as soon as its condition holds).
const DEADLINE: Duration = Duration::from_secs(20);
const TOOLS: &[&str] = &["ip", "nsenter", "ping", "curl"];

/// A namespace made with `ip netns add` for a "runtime's" container: `<prefix>-cni-<tag>`,
/// deleted when dropped.
struct TestNs {
    name: String,
    path: PathBuf,
}

impl TestNs {
    fn add(lab: &Lab, tag: &str) -> Self {
        let name = format!("{}-cni-{tag}", lab.prefix());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        let path = Path::new("/run/netns").join(&name);
        Self { name, path }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A network configuration for `host`'s agent, with `extra` fields merged in.
fn conf(lab: &Lab, host: &str, version: &str, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": version,
        "name": "ferry",
        "type": "ferry-cni",
        "agent": lab.cni_socket(host),
        "capabilities": {"ips": true, "mac": true},
    });
    if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
        c.extend(e);
    }
    c
}

/// One CNI invocation on `host`: exit status and stdout (JSON, or null when empty).
fn cni_raw(
    lab: &Lab,
    host: &str,
    command: &str,
    id: &str,
    ns: Option<&Path>,
    ifname: &str,
    stdin: &[u8],
) -> (i32, Value) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", lab.netns(host).display()))
        .arg(workspace_binary("ferry-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=test")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = ns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd.spawn().expect("nsenter ferry-cni");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{command} {id}: {e}: {text:?}"))
    };
    (out.status.code().unwrap_or(-1), v)
}

fn cni(
    lab: &Lab,
    host: &str,
    command: &str,
    id: &str,
    ns: Option<&Path>,
    ifname: &str,
    conf: &Value,
) -> (i32, Value) {
    cni_raw(
        lab,
        host,
        command,
        id,
        ns,
        ifname,
        conf.to_string().as_bytes(),
    )
}

/// A successful ADD's result.
#[track_caller]
fn added(lab: &Lab, host: &str, id: &str, ns: &TestNs, ifname: &str, conf: &Value) -> Value {
    let (status, v) = cni(lab, host, "ADD", id, Some(&ns.path), ifname, conf);
    assert_eq!(status, 0, "ADD {id} on {host}: {v}");
    v
}

/// A failed invocation's CNI error: (code, msg).
#[track_caller]
fn refused(out: (i32, Value)) -> (u64, String) {
    let (status, v) = out;
    assert_eq!(status, 1, "want a CNI error, got {v}");
    let code = v["code"].as_u64().unwrap_or_else(|| panic!("no code: {v}"));
    (code, v["msg"].as_str().unwrap_or_default().to_owned())
}

/// The address of an ADD's result (`a.b.c.d/32` → a.b.c.d).
fn result_ip(r: &Value) -> Ipv4Addr {
    let a = r["ips"][0]["address"].as_str().unwrap();
    assert!(a.ends_with("/32"), "{r}");
    a.trim_end_matches("/32").parse().unwrap()
}

fn leases(lab: &Lab) -> Vec<IpamLease> {
    lab.api(|c| async move { c.ipam().await })
        .unwrap()
        .unwrap()
        .leases
}

fn endpoints(lab: &Lab) -> Vec<Endpoint> {
    lab.api(|c| async move { c.endpoints().await })
        .unwrap()
        .unwrap()
}

/// The agent's names for containers on `host` (`/run/netns/<prefix>-<host>-c-*`).
fn named(lab: &Lab, host: &str) -> BTreeSet<String> {
    let prefix = ferry_lab::lab::container_netns_prefix(lab.prefix(), host);
    std::fs::read_dir("/run/netns")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// `ip -j CMD` inside a lab namespace.
fn ip_json(lab: &Lab, ns: &Path, args: &[&str]) -> Value {
    let mut all = vec!["ip", "-j"];
    all.extend_from_slice(args);
    let out = lab.exec_in(ns, &all).unwrap();
    assert!(out.status.success(), "{all:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The interfaces of a namespace.
fn links(lab: &Lab, ns: &Path) -> Vec<String> {
    ip_json(lab, ns, &["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_owned())
        .collect()
}

/// Checks inside `ns`: `ifname` is up with `mac` and `ip`/32, and the default route goes via
/// 169.254.1.1 on it.
#[track_caller]
fn assert_wired(lab: &Lab, ns: &Path, ifname: &str, ip: Ipv4Addr, mac: &str) {
    let a = ip_json(lab, ns, &["addr", "show", "dev", ifname]);
    let l = &a[0];
    assert_eq!(l["operstate"], "UP", "{a}");
    assert_eq!(l["address"], mac, "{a}");
    let has = l["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["local"] == ip.to_string() && i["prefixlen"] == 32);
    assert!(has, "{ifname} lacks {ip}/32: {a}");
    let r = ip_json(lab, ns, &["route", "show", "default"]);
    assert_eq!(r[0]["gateway"], "169.254.1.1", "{r}");
    assert_eq!(r[0]["dev"], ifname, "{r}");
}

/// What a refused ADD must leave: the namespace bare, the agents' names, the leases and the
/// endpoints as they were.
#[track_caller]
fn nothing_left(
    lab: &Lab,
    ns: &TestNs,
    before: &(BTreeSet<String>, Vec<IpamLease>, Vec<Endpoint>),
    host: &str,
) {
    assert_eq!(links(lab, &ns.path), ["lo"], "the namespace is bare");
    assert_eq!(named(lab, host), before.0, "no name left on {host}");
    assert_eq!(leases(lab), before.1, "no lease left");
    assert_eq!(endpoints(lab), before.2, "no endpoint left");
}

#[test]
fn add_check_del_against_real_namespaces_and_every_refusal_leaves_nothing() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    workspace_binary("ferry-cni");
    let mut t = Phases::start();
    let mut lab = ferry_tests::agents_lab(LabOptions::default());
    t.mark("lab up");
    let _diag = CountersOnPanic::new(&lab);
    let (n1, n2, n3, n4) = (
        TestNs::add(&lab, "n1"),
        TestNs::add(&lab, "n2"),
        TestNs::add(&lab, "n3"),
        TestNs::add(&lab, "n4"),
    );

    // ADD from the pool on a1 (CNI 1.0.0): the spec's result, and the namespace as it says.
    let c1 = conf(&lab, "a1", "1.0.0", json!({}));
    let r1 = added(&lab, "a1", "c1", &n1, "eth0", &c1);
    let ip1 = result_ip(&r1);
    assert_eq!(r1["cniVersion"], "1.0.0");
    assert_eq!(r1["ips"][0]["gateway"], "169.254.1.1");
    assert!(
        r1["ips"][0].get("version").is_none(),
        "1.0.0 has no ip version"
    );
    assert_eq!(
        r1["routes"][0],
        json!({"dst": "0.0.0.0/0", "gw": "169.254.1.1"})
    );
    let iface = &r1["interfaces"][r1["ips"][0]["interface"].as_u64().unwrap() as usize];
    assert_eq!(iface["name"], "eth0");
    assert_eq!(iface["sandbox"], n1.path.to_str().unwrap());
    let mac1 = iface["mac"].as_str().unwrap().to_owned();
    assert_wired(&lab, &n1.path, "eth0", ip1, &mac1);
    assert_eq!(lab.endpoint_host(ip1).unwrap(), "a1");
    assert!(
        leases(&lab)
            .iter()
            .any(|l| l.ip == ip1 && l.container_id == "c1" && l.host == "a1"),
        "{:?}",
        leases(&lab)
    );
    t.mark("ADD c1");
    let (status, v) = cni(&lab, "a1", "CHECK", "c1", Some(&n1.path), "eth0", &c1);
    assert_eq!(status, 0, "CHECK: {v}");
    t.mark("CHECK c1");

    // The ips and mac capabilities (CNI 0.4.0, interface net1) on b1.
    let want_ip: Ipv4Addr = "10.244.77.7".parse().unwrap();
    let c2 = conf(
        &lab,
        "b1",
        "0.4.0",
        json!({"runtimeConfig": {"ips": ["10.244.77.7/16"], "mac": "02:00:0a:f4:4d:07"}}),
    );
    let r2 = added(&lab, "b1", "c2", &n2, "net1", &c2);
    assert_eq!(result_ip(&r2), want_ip);
    assert_eq!(r2["cniVersion"], "0.4.0");
    assert_eq!(r2["ips"][0]["version"], "4", "0.4.0's format");
    assert_eq!(r2["interfaces"][1]["name"], "net1");
    assert_wired(&lab, &n2.path, "net1", want_ip, "02:00:0a:f4:4d:07");

    // Two ADDs from the pool on two hosts: different addresses.
    let c3 = conf(&lab, "b1", "0.3.1", json!({}));
    let ip3 = result_ip(&added(&lab, "b1", "c3", &n3, "eth0", &c3));
    assert_ne!(ip1, ip3, "two hosts, one address");
    t.mark("ADD c2, c3");

    // A container on another host reaches it (across clouds: a1 → b1 and back).
    wait_for("c1 on a1 pings c2 on b1", DEADLINE, || {
        let out = lab
            .exec_in(
                &n1.path,
                &["ping", "-n", "-q", "-c", "1", "-W", "1", "10.244.77.7"],
            )
            .unwrap();
        out.status.success().then_some(())
    });

    t.mark("ping");
    // Refusals, each with its code and nothing left behind.
    let before = (named(&lab, "a1"), leases(&lab), endpoints(&lab));
    let dup = conf(
        &lab,
        "a1",
        "1.0.0",
        json!({"runtimeConfig": {"ips": ["10.244.77.7"]}}),
    );
    let (code, msg) = refused(cni(&lab, "a1", "ADD", "c4", Some(&n4.path), "eth0", &dup));
    assert_eq!(code, 100, "{msg}");
    assert!(msg.contains("10.244.77.7") && msg.contains("c2"), "{msg}");
    nothing_left(&lab, &n4, &before, "a1");
    // A MAC in use fails at the endpoint's registration, after the address was leased and
    // the namespace attached: both are undone.
    let mac_dup = conf(
        &lab,
        "a1",
        "1.0.0",
        json!({"runtimeConfig": {"mac": "02:00:0a:f4:4d:07"}}),
    );
    let (code, msg) = refused(cni(
        &lab,
        "a1",
        "ADD",
        "c4",
        Some(&n4.path),
        "eth0",
        &mac_dup,
    ));
    assert_eq!(code, 100, "{msg}");
    assert!(msg.contains("02:00:0a:f4:4d:07"), "{msg}");
    nothing_left(&lab, &n4, &before, "a1");
    let (code, msg) = refused(cni_raw(
        &lab,
        "a1",
        "ADD",
        "c4",
        Some(&n4.path),
        "eth0",
        b"{\"cniVersion\": \"1.0.0\", \"name\": ",
    ));
    assert_eq!(code, 6, "malformed: {msg}");
    let mut no_agent = conf(&lab, "a1", "1.0.0", json!({}));
    no_agent.as_object_mut().unwrap().remove("agent");
    let (code, msg) = refused(cni(
        &lab,
        "a1",
        "ADD",
        "c4",
        Some(&n4.path),
        "eth0",
        &no_agent,
    ));
    assert_eq!(code, 7, "{msg}");
    // A network the agent does not serve, and a pool the gateway does not know.
    let other = conf(&lab, "a1", "1.0.0", json!({"name": "other"}));
    let (code, msg) = refused(cni(&lab, "a1", "ADD", "c4", Some(&n4.path), "eth0", &other));
    assert_eq!(code, 7, "{msg}");
    assert!(msg.contains("network \"other\" is not served"), "{msg}");
    let foreign = conf(
        &lab,
        "a1",
        "1.0.0",
        json!({"runtimeConfig": {"ips": ["10.88.0.5/16"]}}),
    );
    let (code, msg) = refused(cni(
        &lab,
        "a1",
        "ADD",
        "c4",
        Some(&n4.path),
        "eth0",
        &foreign,
    ));
    assert_eq!(code, 101, "{msg}");
    nothing_left(&lab, &n4, &before, "a1");

    t.mark("refusals");
    // An agent that is down (SIGKILLed: its socket file stays, nobody answers).
    lab.kill_agent("a2", libc::SIGKILL).unwrap();
    let before2 = (named(&lab, "a2"), leases(&lab), endpoints(&lab));
    let on_a2 = conf(&lab, "a2", "1.0.0", json!({}));
    let (code, msg) = refused(cni(&lab, "a2", "ADD", "c4", Some(&n4.path), "eth0", &on_a2));
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("does not answer"), "{msg}");
    nothing_left(&lab, &n4, &before2, "a2");

    t.mark("agent down");
    // CHECK notices what changed since ADD (and needs CNI 0.4.0 or newer).
    let out = lab
        .exec_in(&n2.path, &["ip", "route", "del", "default"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (code, msg) = refused(cni(&lab, "b1", "CHECK", "c2", Some(&n2.path), "net1", &c2));
    assert_eq!(code, 103, "{msg}");
    assert!(
        msg.contains("no default route via 169.254.1.1 dev net1"),
        "{msg}"
    );
    let (code, msg) = refused(cni(&lab, "b1", "CHECK", "c3", Some(&n3.path), "eth0", &c3));
    assert_eq!(code, 1, "0.3.1 has no CHECK: {msg}");
    // DEL: the address and the endpoint go, the name is unmounted, the namespace bare; twice
    // is fine; CHECK of what is gone is a CNI error.
    let name1 = lab.container_netns("a1", ip1);
    assert!(name1.exists());
    let (status, v) = cni(&lab, "a1", "DEL", "c1", Some(&n1.path), "eth0", &c1);
    assert_eq!((status, &v), (0, &Value::Null));
    assert_eq!(links(&lab, &n1.path), ["lo"]);
    assert!(!name1.exists(), "{} still there", name1.display());
    assert!(endpoints(&lab).iter().all(|e| e.ip != ip1));
    assert!(leases(&lab).iter().all(|l| l.ip != ip1));
    let (status, _) = cni(&lab, "a1", "DEL", "c1", None, "eth0", &c1);
    assert_eq!(status, 0, "DEL twice");
    let (code, msg) = refused(cni(&lab, "a1", "CHECK", "c1", Some(&n1.path), "eth0", &c1));
    assert_eq!(code, 3, "{msg}");
    for (id, ns, ifname, c) in [("c2", &n2, "net1", &c2), ("c3", &n3, "eth0", &c3)] {
        let (status, v) = cni(&lab, "b1", "DEL", id, Some(&ns.path), ifname, c);
        assert_eq!(status, 0, "DEL {id}: {v}");
    }
    assert!(leases(&lab).is_empty(), "{:?}", leases(&lab));
    assert!(endpoints(&lab).is_empty(), "{:?}", endpoints(&lab));
    assert!(named(&lab, "a1").is_empty() && named(&lab, "b1").is_empty());
    t.mark("DELs");

    let prefix = lab.prefix().to_owned();
    drop((n1, n2, n3, n4));
    lab.down().unwrap();
    t.mark("lab down");
    let left = ferry_lab::leftovers(&prefix);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Receives UDP datagrams on port 9100 in a namespace and counts them.
struct Receiver {
    got: Arc<Mutex<usize>>,
    stop: Arc<AtomicBool>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(ns: &Path) -> Self {
        let s = ferry_overlay::netns::run_in(ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 9100)))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let got = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if s.recv(&mut buf).is_ok() {
                    *g.lock().unwrap() += 1;
                }
            }
        });
        Self {
            got,
            stop,
            t: Some(t),
        }
    }

    fn count(&self) -> usize {
        *self.got.lock().unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn add_on_a_migrations_destination_attaches_to_the_held_endpoint() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    workspace_binary("ferry-cni");
    let mut t = Phases::start();
    let lab = ferry_tests::agents_lab(LabOptions::default());
    t.mark("lab up");
    let _diag = CountersOnPanic::new(&lab);
    let (src, dst, peer) = (
        TestNs::add(&lab, "src"),
        TestNs::add(&lab, "dst"),
        TestNs::add(&lab, "peer"),
    );
    let on = |host: &str, extra: Value| conf(&lab, host, "1.0.0", extra);
    let r = added(&lab, "a1", "src1", &src, "eth0", &on("a1", json!({})));
    let ip = result_ip(&r);
    let mac = r["interfaces"][1]["mac"].as_str().unwrap().to_owned();
    let peer_ip = result_ip(&added(
        &lab,
        "a2",
        "peer1",
        &peer,
        "eth0",
        &on("a2", json!({})),
    ));
    assert_ne!(ip, peer_ip);
    let c = ip.to_string();
    let step = |args: &[&str]| {
        lab.ferry_json(args)
            .unwrap_or_else(|e| panic!("ferry {args:?}: {e}"))
    };
    t.mark("ADD src, peer");
    step(&["migrate", "prepare", "--container", &c, "--to", "b1"]);
    step(&["migrate", "freeze", "--container", &c]);
    t.mark("prepare, freeze");

    // The source's runtime deletes its copy after its checkpoint: it detaches locally, the
    // endpoint (still on a1, frozen) and its lease stay, and a1's agent, whose registry still
    // wants the container there until the release, rebuilds it in a namespace of its own
    // (where an aborted migration's restore on the source would attach again).
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let runtime_ns = ino(&src.path);
    let (status, v) = cni(
        &lab,
        "a1",
        "DEL",
        "src1",
        None,
        "eth0",
        &on("a1", json!({})),
    );
    assert_eq!(status, 0, "{v}");
    let a1_name = lab.container_netns("a1", ip);
    assert!(
        !a1_name.exists() || ino(&a1_name) != runtime_ns,
        "a1's name no longer the runtime's namespace"
    );
    assert_eq!(
        lab.endpoint_host(ip).unwrap(),
        "a1",
        "the registry entry stays"
    );
    let leases_before = leases(&lab);
    assert!(
        leases_before.iter().any(|l| l.ip == ip),
        "{leases_before:?}"
    );

    // The destination's runtime restores it into a new namespace and asks for its address
    // and MAC: the prepared, held endpoint moves into that namespace.
    let want = on(
        "b1",
        json!({"runtimeConfig": {"ips": [format!("{ip}/32")], "mac": mac}}),
    );
    t.mark("DEL on the source");
    let r = added(&lab, "b1", "dst1", &dst, "eth0", &want);
    t.mark("ADD on the destination (attach)");
    assert_eq!(result_ip(&r), ip);
    assert_wired(&lab, &dst.path, "eth0", ip, &mac);
    assert_eq!(
        ino(&lab.container_netns("b1", ip)),
        ino(&dst.path),
        "b1's name is the runtime's namespace now"
    );
    assert_eq!(leases(&lab), leases_before, "nothing allocated");
    let (status, v) = cni(&lab, "b1", "CHECK", "dst1", Some(&dst.path), "eth0", &want);
    assert_eq!(status, 0, "CHECK: {v}");

    // Nothing reaches the new namespace before the release: the peer's datagrams are held.
    let rx = Receiver::start(&dst.path);
    let tx =
        ferry_overlay::netns::run_in(&peer.path, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .unwrap()
            .unwrap();
    for i in 0u32..50 {
        tx.send_to(&i.to_be_bytes(), (ip, 9100)).unwrap();
    }
    wait_for("b1 holds the 50 datagrams", DEADLINE, || {
        (gauge(&lab, "b1", "ferry_hold_queued_packets").unwrap_or(0) >= 50).then_some(())
    });
    assert_eq!(rx.count(), 0, "delivered before the release");
    step(&["migrate", "release", "--container", &c]);
    wait_for(
        "the held datagrams arrive after the release",
        DEADLINE,
        || (rx.count() >= 50).then_some(()),
    );
    assert_eq!(lab.endpoint_host(ip).unwrap(), "b1");

    // DEL on the destination: the endpoint and its lease go.
    let (status, v) = cni(&lab, "b1", "DEL", "dst1", Some(&dst.path), "eth0", &want);
    assert_eq!(status, 0, "{v}");
    assert!(endpoints(&lab).iter().all(|e| e.ip != ip));
    assert!(leases(&lab).iter().all(|l| l.ip != ip));
    let (status, v) = cni(
        &lab,
        "a2",
        "DEL",
        "peer1",
        None,
        "eth0",
        &on("a2", json!({})),
    );
    assert_eq!(status, 0, "{v}");
    assert!(leases(&lab).is_empty(), "{:?}", leases(&lab));
    drop(rx);
    t.mark("hold, release, DELs");

    let prefix = lab.prefix().to_owned();
    drop((src, dst, peer));
    lab.down().unwrap();
    t.mark("lab down");
    let left = ferry_lab::leftovers(&prefix);
    assert!(left.is_empty(), "left behind: {left:?}");
}
