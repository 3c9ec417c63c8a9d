//! Secrets out of containers' reach (issue 12, finding 1), in a real lab: a process inside a
//! container started by the agent's runtime tries to read the lab's API token, a TLS key
//! file, the gateway's state, the agents' state, the agents' and the gateway's /proc entries,
//! another container's /proc entries and the host's raw disk (where the host can read it), to write the host's files and to
//! unmount what hides the secrets: every attempt fails, while its own file, an ordinary host
//! file and its own /proc are readable (so the probe can tell). The same tree is then moved
//! by CRIU to another host (another cloud), and everything holds there too. The files the
//! lab and the daemons write are root-only (0600 files, 0700 directories).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use ferry_api::run::{RunReport, RunState};
use ferry_lab::{Lab, LabOptions};
use ferry_tests::{agents_lab, require_root_and_tools, wait_for};

const C: &str = "10.244.1.10";
const OTHER: &str = "10.244.1.11";

/// The probe, PID 1 of the container: each time `/dev/shm/go` appears it runs every check
/// of its arguments (`KIND:LABEL=WHAT`) and writes one `read|denied LABEL` line per check to
/// `/dev/shm/out`. Kinds: `r` reads a file, `l` lists a directory (read = it shows anything),
/// `w` creates a file, `x` runs a shell command (read = it succeeded).
const PROBE: &str = r#"
while :; do
  if [ -e /dev/shm/go ]; then
    rm -f /dev/shm/go /dev/shm/out
    echo mine > /dev/shm/mine
    for spec in "$@"; do
      kind=${spec%%:*}; rest=${spec#*:}; label=${rest%%=*}; what=${rest#*=}
      case $kind in
        r) cat "$what" > /dev/null 2>&1 ;;
        l) [ -n "$(ls -A "$what" 2> /dev/null)" ] ;;
        w) (echo x > "$what") 2> /dev/null ;;
        x) sh -c "$what" > /dev/null 2>&1 ;;
      esac
      if [ $? -eq 0 ]; then echo "read $label"; else echo "denied $label"; fi
    done > /dev/shm/out.tmp
    mv /dev/shm/out.tmp /dev/shm/out
  fi
  sleep 0.05
done
"#;

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn pid_of(lab: &Lab, kind: &str, host: Option<&str>) -> i32 {
    ferry_lab::status(lab.prefix())
        .unwrap()
        .processes
        .iter()
        .find(|p| p.process.kind == kind && (host.is_none() || p.process.host.as_deref() == host))
        .unwrap_or_else(|| panic!("no {kind} {host:?} in the lab"))
        .process
        .pid
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Runs the probe once in the container whose PID 1 is `pid` (host PID): its verdicts.
fn probe(pid: i32) -> BTreeMap<String, String> {
    let shm = PathBuf::from(format!("/proc/{pid}/root/dev/shm"));
    let out = shm.join("out");
    let _ = std::fs::remove_file(&out);
    std::fs::write(shm.join("go"), b"").unwrap();
    let text = wait_for("the probe's answer", Duration::from_secs(20), || {
        std::fs::read_to_string(&out).ok()
    });
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(verdict, label)| (label.to_owned(), verdict.to_owned()))
        .collect()
}

/// The process's capability sets and no_new_privs, from the host's /proc.
fn privileges(pid: i32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| {
            [
                "CapInh:",
                "CapPrm:",
                "CapEff:",
                "CapBnd:",
                "CapAmb:",
                "NoNewPrivs:",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn check(pid: i32, host: &str, secrets: &[&str], controls: &[&str]) {
    let verdicts = probe(pid);
    eprintln!("probe on {host}: {verdicts:?}");
    for label in secrets {
        assert_eq!(
            verdicts.get(*label).map(String::as_str),
            Some("denied"),
            "{label} on {host}: {verdicts:?}"
        );
    }
    for label in controls {
        assert_eq!(
            verdicts.get(*label).map(String::as_str),
            Some("read"),
            "control {label} on {host}: {verdicts:?}"
        );
    }
    assert_eq!(
        privileges(pid),
        [
            "CapInh: 0000000000000000",
            "CapPrm: 0000000000000000",
            "CapEff: 0000000000000000",
            "CapBnd: 0000000000000000",
            "CapAmb: 0000000000000000",
            "NoNewPrivs: 1",
        ],
        "on {host}"
    );
}

#[test]
fn a_containers_process_cannot_read_secrets_before_or_after_a_migration() {
    if !require_root_and_tools(&["ip", "criu"]) {
        return;
    }
    let lab = agents_lab(LabOptions::default());
    lab.add_container("a1", ip(C)).unwrap();
    lab.add_container("a1", ip(OTHER)).unwrap();
    lab.sync().unwrap();
    let state = lab.state_dir();
    let cp = lab.control().expect("the lab has a gateway");
    // The lab's TLS material: a1's own key (the container's host) and the CA's.
    let tls = cp.tls_dir.clone();
    let key = cp
        .tls_files(ferry_lab::control::Party::Host("a1"))
        .expect("the lab speaks TLS")
        .key;
    let ca_key = tls.join("ca").join("ca-key.pem");
    assert!(key.exists() && ca_key.exists());

    let other = lab
        .start_process(ip(OTHER), &["/bin/sleep", "1000"])
        .unwrap();
    let gateway = pid_of(&lab, "gateway", None);
    let (agent_a1, agent_b1) = (
        pid_of(&lab, "agent", Some("a1")),
        pid_of(&lab, "agent", Some("b1")),
    );
    let runtime_json =
        |host: &str| ferry_lab::lab::agent_state_dir(lab.prefix(), host).join("runtime.json");
    let registry = cp.state_dir.join("registry.json");
    // The changes since registry.json was written whole (the lab's start made several).
    let journal = cp.state_dir.join("registry.journal");
    let root_device = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .and_then(|l| l.rsplit(' ').nth(1).map(str::to_owned))
        .filter(|d| d.starts_with("/dev/"))
        .unwrap_or_else(|| "/dev/vda".into());
    let s = |p: &Path| p.display().to_string();
    let host_file = PathBuf::from(format!("/etc/ferry-secrets-probe-{}", lab.prefix()));
    // Written by the probe only if the host's files are writable: removed however the test
    // ends.
    let _remove = RemoveOnDrop(host_file.clone());
    let not_written = || {
        assert!(
            !host_file.exists(),
            "the container wrote {}",
            host_file.display()
        )
    };
    // (kind, label, target, is a secret: must be denied; otherwise a control: must succeed)
    let mut targets: Vec<(char, &str, String, bool)> = vec![
        ('r', "token", s(&cp.token_file), true),
        ('r', "tls_key", s(&key), true),
        ('r', "ca_key", s(&ca_key), true),
        ('r', "gateway_state", s(&registry), true),
        ('r', "gateway_journal", s(&journal), true),
        ('r', "a1_runtime", s(&runtime_json("a1")), true),
        ('r', "b1_runtime", s(&runtime_json("b1")), true),
        ('l', "lab_dir", s(&state), true),
        (
            'r',
            "a1_agent_environ",
            format!("/proc/{agent_a1}/environ"),
            true,
        ),
        (
            'r',
            "b1_agent_environ",
            format!("/proc/{agent_b1}/environ"),
            true,
        ),
        (
            'r',
            "gateway_cmdline",
            format!("/proc/{gateway}/cmdline"),
            true,
        ),
        ('l', "gateway_fds", format!("/proc/{gateway}/fd"), true),
        (
            'r',
            "other_environ",
            format!("/proc/{}/environ", other.pid),
            true,
        ),
        (
            'l',
            "other_root",
            format!("/proc/{}/root/", other.pid),
            true,
        ),
        ('w', "host_file", s(&host_file), true),
        // What hides the lab's directory (`[runtime] hide` has /run/ferry-lab).
        (
            'x',
            "unhide",
            format!("umount -l {}", state.parent().unwrap().display()),
            true,
        ),
        ('x', "mount", "mount -t tmpfs probe /mnt".into(), true),
        // Controls: what a container may do, so that a denial means something.
        ('r', "own_file", "/dev/shm/mine".into(), false),
        ('r', "host_os_release", "/etc/os-release".into(), false),
        ('r', "own_status", "/proc/self/status".into(), false),
        ('l', "own_proc", "/proc/1".into(), false),
    ];
    // The host's raw disk, where the host itself can read it (not in every sandbox).
    if std::fs::File::open(&root_device).is_ok() {
        targets.push(('r', "raw_disk", root_device, true));
    }
    // The host (root, outside any container) can read every secret: the probe's targets exist.
    for (kind, label, what, secret) in &targets {
        match kind {
            'r' if *secret => {
                assert!(
                    std::fs::read(what).is_ok(),
                    "{label}: {what} unreadable on the host"
                )
            }
            'l' if *secret => assert!(
                std::fs::read_dir(what).is_ok_and(|mut d| d.next().is_some()),
                "{label}: {what} empty on the host"
            ),
            _ => {}
        }
    }
    let secrets: Vec<&str> = targets.iter().filter(|t| t.3).map(|t| t.1).collect();
    let controls: Vec<&str> = targets.iter().filter(|t| !t.3).map(|t| t.1).collect();

    let mut argv = vec![
        "/bin/sh".to_owned(),
        "-c".into(),
        PROBE.into(),
        "probe".into(),
    ];
    argv.extend(targets.iter().map(|(k, l, w, _)| format!("{k}:{l}={w}")));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let p = lab.start_process(ip(C), &argv).unwrap();
    check(p.pid, "a1", &secrets, &controls);
    not_written();

    // Moved by CRIU to b1 (another cloud): the restored tree is as sealed.
    let out = lab
        .ferry(&["--json", "migrate", "run", "--container", C, "--to", "b1"])
        .unwrap();
    let report: RunReport = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!(
        "migrated: {} stopped {:.1} ms, image {} B",
        report.state.as_str(),
        report.stopped_ms,
        report.image_bytes
    );
    assert_eq!(report.state, RunState::Released, "{report:?}");
    let moved = lab.process(ip(C)).unwrap().expect("the restored process");
    assert_eq!(lab.endpoint_host(ip(C)).unwrap(), "b1");
    assert_ne!(moved.pid, p.pid);
    check(moved.pid, "b1", &secrets, &controls);
    not_written();

    // Root only on disk: the lab's directory, the token and the key files, the gateway's
    // state and run reports, the agents' state.
    for dir in [
        state.clone(),
        tls.clone(),
        cp.state_dir.clone(),
        cp.state_dir.join("runs"),
        ferry_lab::lab::agent_state_dir(lab.prefix(), "a1"),
        ferry_lab::lab::agent_state_dir(lab.prefix(), "b1"),
        lab.criu_work_dir("a1"),
        lab.criu_work_dir("b1"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 0);
    }
    let runs: Vec<PathBuf> = std::fs::read_dir(cp.state_dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!runs.is_empty());
    for file in [
        cp.token_file.clone(),
        key,
        registry,
        journal,
        runtime_json("a1"),
        runtime_json("b1"),
        state.join("state.json"),
    ]
    .into_iter()
    .chain(runs)
    {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    lab.down().unwrap();
}
