//! The container's memory across a WAN link (the `wan` profile between clouds a and b: 60 ms
//! RTT, 200 Mbit/s): a server holding 256 MiB that checks and rewrites its own memory without
//! end (`ferry-workload serve --memory-mb`), under a live client through its public address,
//! moved a1 → b1 with `--memory lazy` (post-copy: CRIU's lazy pages between the agents, over
//! TLS) and back with `--memory copy`. Each move: released, zero resets, every reply right,
//! and the workload's own check of every page clean after the last page arrived. The lazy run's
//! report carries the page transfer (the `pages` phase, its bytes).
use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use ferry_api::run::{MemoryMode, PAGES_PHASE, PHASES, RunReport, RunState};
use ferry_lab::{Lab, LabOptions, Topology};
use ferry_tests::{agents_lab, require_root_and_tools, wait_for, workspace_binary};
use serde_json::Value;

const C: &str = "10.244.1.10";
const PUBLIC: &str = "203.0.113.131";
const TOOLS: &[&str] = &["ip", "ss", "criu"];
const MEMORY_MB: u64 = 256;

fn c() -> Ipv4Addr {
    C.parse().unwrap()
}

/// The workload's figures for its memory (its answer to `MEM`, asked from the internet side
/// through the public address on a connection of its own).
fn memory_report(lab: &Lab) -> Option<Value> {
    let script = format!("exec 3<>/dev/tcp/{PUBLIC}/7000 && echo MEM >&3 && timeout 5 head -1 <&3");
    let out = lab
        .exec("inet", &["timeout", "10", "bash", "-c", &script])
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim().strip_prefix("MEM ")?).ok()
}

/// Every page checked by the workload itself, now (after the last page arrived): none wrong,
/// none ever found wrong by its walk, and the walk went on since `since` (its figures then).
fn assert_memory_clean(lab: &Lab, what: &str, since: Option<&Value>) -> Value {
    let r = wait_for(
        &format!("{what}: the workload's memory figures"),
        Duration::from_secs(60),
        || {
            memory_report(lab).filter(|r| {
                r["pages_checked"].as_u64().unwrap_or(0)
                    > since.map_or(0, |s| s["pages_checked"].as_u64().unwrap_or(0))
            })
        },
    );
    eprintln!("{what}: memory {r}");
    assert_eq!(r["mb"].as_u64(), Some(MEMORY_MB), "{r}");
    assert_eq!(r["bad_now"].as_u64(), Some(0), "{what}: {r}");
    assert_eq!(r["bad_pages"].as_u64(), Some(0), "{what}: {r}");
    r
}

fn run_args(to: &str, memory: MemoryMode) -> [&str; 9] {
    [
        "--json",
        "migrate",
        "run",
        "--container",
        C,
        "--to",
        to,
        "--memory",
        memory.as_str(),
    ]
}

fn migrate(lab: &Lab, from: &str, to: &str, memory: MemoryMode) -> RunReport {
    let t0 = Instant::now();
    let out = lab.ferry(&run_args(to, memory)).expect("running ferry");
    released(lab, from, to, memory, t0, &out)
}

/// The run's report from `ferry`'s output: released, as asked, without error.
fn released(
    lab: &Lab,
    from: &str,
    to: &str,
    memory: MemoryMode,
    t0: Instant,
    out: &std::process::Output,
) -> RunReport {
    let args = run_args(to, memory);
    let (code, r) = ferry_tests::run_report(&format!("ferry {args:?}"), out);
    eprintln!("{from} -> {to} ({memory}): wall {:?}", t0.elapsed());
    assert_eq!(
        r.state,
        RunState::Released,
        "{from} -> {to}: {r:?}\nagent logs: {} {}",
        lab.agent_log(from).display(),
        lab.agent_log(to).display()
    );
    assert_eq!(code, 0, "{r:?}");
    assert_eq!(r.memory, memory, "{r:?}");
    assert!(r.error.is_none(), "{r:?}");
    r
}

fn lab_with_memory_server(topology: Topology) -> (Lab, ferry_tests::workload::Workload) {
    let workload = workspace_binary("ferry-workload");
    let lab = agents_lab(LabOptions {
        topology,
        ..LabOptions::default()
    });
    let ns = lab.add_container("a1", c()).expect("container on a1");
    lab.ferry_json(&["public", "add", "--public", PUBLIC, "--container", C])
        .expect("public add");
    lab.sync().unwrap();
    let mb = MEMORY_MB.to_string();
    lab.start_process(
        c(),
        &[
            workload.to_str().unwrap(),
            "serve",
            "--port",
            "7000",
            "--memory-mb",
            &mb,
            // Its pages change while they move, more slowly than the link carries them (a
            // walk faster than the link faults on every page: see docs/migration.md).
            "--memory-mb-per-s",
            "4",
        ],
    )
    .expect("start the server");
    ferry_tests::workload::wait_listening(&lab, &ns, 7000);
    let to = format!("{PUBLIC}:7000");
    let client = ferry_tests::workload::Workload::start(
        &lab.netns("inet"),
        &[
            "client",
            "--to",
            &to,
            "--connections",
            "2",
            "--interval-ms",
            "10",
            "--duration-ms",
            "600000",
            "--json",
        ],
    );
    client.connected(Duration::from_secs(10));
    (lab, client)
}

#[test]
fn a_256_mib_container_moves_lazily_across_the_wan_and_back_by_copy() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let topology = ferry_bench::links::with_link(Topology::default_lab(), "a", "b", "wan")
        .expect("wan between a and b");
    let (lab, client) = lab_with_memory_server(topology);
    let before = assert_memory_clean(&lab, "before the moves", None);

    // Post-copy: running at b1 once everything but the pages moved; the pages follow. The run
    // goes on until the last page arrived, and meanwhile the container cannot move again.
    let t0 = Instant::now();
    let mut run = lab
        .ferry_command(&run_args("b1", MemoryMode::Lazy))
        .unwrap()
        .spawn()
        .expect("ferry migrate run");
    wait_for(
        "the lazy run's release (b1 owns the container)",
        Duration::from_secs(60),
        || (lab.endpoint_host(c()).ok()? == "b1").then_some(()),
    );
    assert!(
        run.try_wait().unwrap().is_none(),
        "the lazy run ended with its release: the pages of 256 MiB across the wan take longer"
    );
    let again = lab
        .ferry(&["migrate", "run", "--container", C, "--to", "a1"])
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success(),
        "a second run was accepted: {again:?}"
    );
    assert!(err.contains("is still going"), "{err}");
    let out = run.wait_with_output().expect("ferry migrate run");
    let lazy = released(&lab, "a1", "b1", MemoryMode::Lazy, t0, &out);
    assert_eq!(lab.endpoint_host(c()).unwrap(), "b1");
    let names: Vec<&str> = lazy.phases.iter().map(|p| p.name.as_str()).collect();
    let mut want: Vec<&str> = PHASES.to_vec();
    want.push(PAGES_PHASE);
    assert_eq!(names, want, "{lazy:?}");
    let pages = lazy.phase(PAGES_PHASE).unwrap();
    let page_bytes = pages.bytes.unwrap_or(0);
    assert!(
        page_bytes >= MEMORY_MB << 20,
        "the pages phase moved {page_bytes} bytes of a {MEMORY_MB} MiB working set: {lazy:?}"
    );
    // The images themselves carried (almost) no memory.
    assert!(
        lazy.image_bytes < page_bytes / 8,
        "lazy images {} B vs pages {page_bytes} B",
        lazy.image_bytes
    );
    assert_eq!(lab.endpoint_host(c()).unwrap(), "b1");
    let after_lazy = assert_memory_clean(&lab, "after the lazy move", Some(&before));

    // Stop-and-copy back: every page in the images.
    let copy = migrate(&lab, "b1", "a1", MemoryMode::Copy);
    let names: Vec<&str> = copy.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, PHASES, "{copy:?}");
    assert!(
        copy.image_bytes >= MEMORY_MB << 20,
        "copy images {} B",
        copy.image_bytes
    );
    // The page files streamed while CRIU wrote them: part of the memory crossed during the
    // dump, the rest after it.
    assert!(
        copy.image_bytes_during_dump > 0 && copy.image_bytes_during_dump < copy.image_bytes,
        "{} of {} image bytes crossed during the dump",
        copy.image_bytes_during_dump,
        copy.image_bytes
    );
    assert_eq!(lab.endpoint_host(c()).unwrap(), "a1");
    assert_memory_clean(&lab, "after the copy move", Some(&after_lazy));

    let (code, s) = client.stop(Duration::from_secs(20));
    eprintln!(
        "figures: lazy stopped {:.1} ms, pages {:.1} ms ({} B), total {:.1} ms; copy stopped \
         {:.1} ms, images {} B ({} B during the dump), total {:.1} ms; client max_gap_ms {} \
         retransmits {}",
        lazy.stopped_ms,
        pages.ms,
        page_bytes,
        lazy.total_ms,
        copy.stopped_ms,
        copy.image_bytes,
        copy.image_bytes_during_dump,
        copy.total_ms,
        s["max_gap_ms"],
        s["retransmits"]
    );
    assert_eq!(s["resets"].as_u64(), Some(0), "{s}");
    assert_eq!(s["mismatches"].as_u64(), Some(0), "{s}");
    assert_eq!(s["unanswered"].as_u64(), Some(0), "{s}");
    assert_eq!(s["replies"], s["requests"], "{s}");
    assert_eq!(s["alive"].as_u64(), Some(2), "{s}");
    assert_eq!(code, 0, "{s}");
}

/// A lazy run whose restore fails after the destination's lazy-pages daemon connected (CRIU's
/// own fault injection, `--fail restore`): rolled back before the release, so the source's
/// tree, seized by its page server, is stopped, the page server ended, and the tree resumed
/// by the abort: the same process on a1, its memory intact, the client untouched. Then the
/// same container moves lazily for real.
/// The files named `name` under `dir`.
fn find_named(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_named(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}

/// Whether a `criu dump` whose images are under `work` runs (a lazy dump serves its pages
/// until it ends).
fn criu_dump_under(work: &Path) -> bool {
    let work = work.to_string_lossy();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| {
            let args: Vec<String> = c
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.first().is_some_and(|a| a.ends_with("criu"))
                && args.iter().any(|a| a == "dump")
                && args.iter().any(|a| a.starts_with(work.as_ref()))
        })
}

#[test]
fn a_lazy_run_that_fails_before_the_release_rolls_back_to_the_same_tree() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let (lab, client) = lab_with_memory_server(Topology::default_lab());
    let before = assert_memory_clean(&lab, "before", None);
    let pid = lab.process(c()).unwrap().expect("the server").pid;
    let mut args = run_args("b1", MemoryMode::Lazy).to_vec();
    args.extend(["--fail", "restore"]);
    // The source is held once the destination refused, until CRIU's page server has ended by
    // itself (the destination's lazy-pages daemon went with its failed restore) and let the
    // tasks go: CRIU's failure path would let the tree run with its connections still in
    // repair mode, where a read fails and the server closes them. The tree must be stopped.
    let armed = lab.fault_dir().join("lazy-refused");
    let reached = lab.fault_dir().join("lazy-refused.reached");
    std::fs::write(&armed, b"").unwrap();
    let child = lab
        .ferry_command(&args)
        .expect("the ferry command")
        .spawn()
        .expect("running ferry");
    wait_for(
        "the source hears the destination's refusal",
        Duration::from_secs(60),
        || reached.exists().then_some(()),
    );
    let work = lab.criu_work_dir("a1");
    let status = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        Some((field("TracerPid:")?, field("State:")?))
    };
    wait_for(
        "CRIU's page server on a1 ends and lets the tree go",
        Duration::from_secs(30),
        || (!criu_dump_under(&work) && status()?.0 == "0").then_some(()),
    );
    // How the page server ended, from CRIU's log (still there while the source is held): the
    // destination's lazy-pages daemon may close its session cleanly or just go. Only the
    // second is a failure of the page server, the case CRIU patch 0007 is about.
    let failed = find_named(&work, "dump.log").iter().any(|l| {
        std::fs::read_to_string(l).is_ok_and(|t| t.contains("Lazy pages transfer FAILED"))
    });
    eprintln!("the source's page server failed: {failed}");
    // Let go with a SIGSTOP pending, a task runs for a moment (`R`) to take it: the tree must
    // come to a stop. Unpatched, after a failed page server CRIU let it run on (`S`, `R`) and
    // the server closed its connections, still in repair mode.
    let stopped = ferry_tests::poll_until(Duration::from_secs(10), || {
        status().filter(|s| s.1.starts_with('T'))
    });
    assert!(
        stopped.is_some(),
        "the tree stays stopped once CRIU let it go (its page server failed: {failed}): {:?}",
        status()
    );
    std::fs::remove_file(&armed).unwrap();
    let out = child.wait_with_output().expect("ferry's output");
    let (code, r) = ferry_tests::run_report(&format!("ferry {args:?}"), &out);
    assert_eq!(
        r.state,
        RunState::RolledBack,
        "{r:?}\nagent logs: {} {}",
        lab.agent_log("a1").display(),
        lab.agent_log("b1").display()
    );
    assert_eq!(code, 3, "{r:?}");
    assert!(r.phase(PAGES_PHASE).is_none(), "{r:?}");
    assert_eq!(lab.endpoint_host(c()).unwrap(), "a1");
    let p = wait_for(
        "the source's tree running again",
        Duration::from_secs(30),
        || {
            lab.process(c())
                .ok()
                .flatten()
                .filter(|p| p.running && p.fenced.is_none())
        },
    );
    assert_eq!(p.pid, pid, "the source's own tree resumed: {p:?}");
    let after = assert_memory_clean(&lab, "after the rollback", Some(&before));

    let t0 = Instant::now();
    let out = lab.ferry(&run_args("b1", MemoryMode::Lazy)).unwrap();
    let r = released(&lab, "a1", "b1", MemoryMode::Lazy, t0, &out);
    assert!(r.phase(PAGES_PHASE).is_some(), "{r:?}");
    assert_memory_clean(&lab, "after the lazy move", Some(&after));

    let (code, s) = client.stop(Duration::from_secs(20));
    eprintln!("client: {s}");
    assert_eq!(s["resets"].as_u64(), Some(0), "{s}");
    assert_eq!(s["mismatches"].as_u64(), Some(0), "{s}");
    assert_eq!(s["unanswered"].as_u64(), Some(0), "{s}");
    assert_eq!(s["alive"].as_u64(), Some(2), "{s}");
    assert_eq!(code, 0, "{s}");
}
