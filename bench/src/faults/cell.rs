//! Running the matrix: the labs (one per fault, replaced after a cell that leaves it
//! unhealthy), and one cell: client, arm, run, land the fault, converge, measure.

use std::{
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use ferry_api::{
    ApiError, Endpoint, Migration, MigrationPhase,
    run::{RunReport, RunState},
};
use ferry_lab::{Lab, LabError, LabOptions, ROUTER, bins::find_binary, clock::ms, leftovers};

use super::{
    Cell, Fault, FaultsArgs, LabRecord, Phase, Side,
    copies::{self, Copies},
};
use crate::{
    BenchError, Progress,
    handoff::{PAYLOAD_BYTES, request_bytes},
    migrate::{CONTAINER, HOST_A, HOST_B, PORT, PUBLIC},
    workload::{Stream, Workload, WorkloadError},
};

/// How long a run gets to reach the armed point.
const REACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a lab gets, between cells, to settle (the previous move's forwarding grace, 2 s).
const QUIET_TIMEOUT: Duration = Duration::from_secs(20);
/// The host of the second gateway in `kill-gateway-takeover`'s labs.
const TAKEOVER_GATEWAY: &str = "a2";
/// How often the harness looks while it waits for convergence.
const TICK: Duration = Duration::from_millis(100);
/// The client's progress lines, this often.
const PROGRESS_MS: u64 = 100;
/// The client counts as answered again when nothing older than this is owed.
const ANSWERED_MS: f64 = 1000.0;
/// Size of the tmpfs standing for the destination's disk (`disk-full-dest`).
const DISK_SIZE: &str = "16m";
/// The file that fills it.
const FILLER: &str = "ferry-faults-filler";

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

impl FaultError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

fn container() -> Ipv4Addr {
    CONTAINER.parse().expect("a valid address")
}

fn other(host: &str) -> &'static str {
    if host == HOST_A { HOST_B } else { HOST_A }
}

/// Runs every selected cell; returns the cells and the labs used.
pub(crate) fn run_matrix(
    p: &Progress,
    args: &FaultsArgs,
) -> Result<(Vec<Cell>, Vec<LabRecord>), BenchError> {
    let bin = find_binary("ferry-workload", "ferry-workload")?;
    let bin = bin.canonicalize().unwrap_or(bin);
    find_binary("ferry", "ferry-cli")?;
    find_binary("ferry-agent", "ferry-agent")?;
    let (mut cells, mut labs) = (Vec::new(), Vec::new());
    for fault in args.faults() {
        let mut current: Option<FaultLab> = None;
        for repeat in 1..=args.repeat {
            for phase in args.phases() {
                if let Some(fl) = current.as_mut()
                    && let Err(e) = fl.quiet()
                {
                    p.say(format!(
                        "{}: lab not settled ({e}): a new one",
                        fl.lab.prefix()
                    ));
                    let mut rec = current.take().expect("present").retire(p);
                    rec.replaced = Some(format!("not settled before the next cell: {e}"));
                    labs.push(rec);
                }
                if current.is_none() {
                    match FaultLab::up(p, fault, &bin) {
                        Ok(fl) => current = Some(fl),
                        Err(rec) => {
                            let error = rec.error.clone();
                            labs.push(*rec);
                            let mut c = Cell {
                                fault: fault.name().into(),
                                phase: phase.point().into(),
                                repeat,
                                outcome: "error".into(),
                                run_state: "unknown".into(),
                                error,
                                ..Cell::default()
                            };
                            c.judge();
                            cells.push(c);
                            continue;
                        }
                    }
                }
                let fl = current.as_mut().expect("a lab");
                let cell = fl.run_cell(p, args, phase, repeat);
                p.say(format!(
                    "{} at {} (#{repeat}): {}, {} copies ({}), {} resets, {} B lost, gap {} ms, \
                     converged {}{}",
                    cell.fault,
                    cell.phase,
                    cell.outcome,
                    cell.copies,
                    cell.copy_hosts.join(","),
                    cell.resets,
                    cell.bytes_lost,
                    cell.gap_ms.map_or("-".into(), |g| format!("{g:.0}")),
                    cell.converge_ms
                        .map_or("never".into(), |c| format!("after {c:.0} ms")),
                    if cell.ok {
                        ": ok".to_owned()
                    } else {
                        format!(": NOT OK: {}", cell.violations.join("; "))
                    }
                ));
                // A lab the cell left in a known state goes on (the next cell waits until it
                // settled); any other is replaced.
                let healthy = cell.copies == 1
                    && cell.ends_on.is_some()
                    && cell.ends_on == cell.endpoint_host
                    && cell.converged;
                let why = format!(
                    "{} at {} left it with {} copies running ({}), the endpoint on {}{}",
                    cell.fault,
                    cell.phase,
                    cell.copies,
                    cell.copy_hosts.join(", "),
                    cell.endpoint_host.as_deref().unwrap_or("-"),
                    if cell.converged {
                        ""
                    } else {
                        ", not converged"
                    }
                );
                cells.push(cell);
                if !healthy {
                    let mut rec = current.take().expect("a lab").retire(p);
                    rec.replaced = Some(why);
                    labs.push(rec);
                }
            }
        }
        if let Some(fl) = current.take() {
            labs.push(fl.retire(p));
        }
    }
    Ok((cells, labs))
}

/// A lab for one fault, with the container, its public address and its server.
struct FaultLab {
    lab: Lab,
    fault: Fault,
    /// Where the container runs now.
    here: String,
    hosts: Vec<String>,
    bin: PathBuf,
    /// tmpfs mounts standing for the hosts' disks (`disk-full-dest`).
    disks: Vec<PathBuf>,
    /// The host of the etcd member killed in this cell (`kill-etcd-*`), started again once the
    /// cell converged.
    killed_member: Option<String>,
    cells: u32,
}

impl FaultLab {
    fn up(p: &Progress, fault: Fault, bin: &Path) -> Result<Self, Box<LabRecord>> {
        p.say(format!("{}: bringing up a lab with agents", fault.name()));
        let topology = match fault {
            Fault::KillGatewayTakeover | Fault::KillGatewayRestartEtcd | Fault::CutGatewayEtcd => {
                ferry_lab::Topology {
                    etcd: true,
                    extra_gateways: vec![TAKEOVER_GATEWAY.into()],
                    ..ferry_lab::Topology::default()
                }
            }
            Fault::KillEtcdMember | Fault::KillEtcdLeader => ferry_lab::Topology {
                etcd: true,
                ..ferry_lab::Topology::default()
            },
            _ => ferry_lab::Topology::default(),
        };
        let lab = Lab::up(LabOptions {
            topology,
            start_agents: true,
            ..LabOptions::default()
        })
        .map_err(|e| {
            Box::new(LabRecord {
                fault: fault.name().into(),
                error: Some(format!("lab up: {e}")),
                ..LabRecord::default()
            })
        })?;
        let hosts = lab
            .topology()
            .hosts
            .iter()
            .map(|h| h.name.clone())
            .collect();
        let mut fl = Self {
            lab,
            fault,
            here: HOST_A.into(),
            hosts,
            bin: bin.to_owned(),
            disks: Vec::new(),
            killed_member: None,
            cells: 0,
        };
        match fl.set_up() {
            Ok(()) => {
                p.say(format!(
                    "{}: lab {} up, {CONTAINER} on {HOST_A} as {PUBLIC}",
                    fault.name(),
                    fl.lab.prefix()
                ));
                Ok(fl)
            }
            Err(e) => {
                let mut rec = fl.retire(p);
                rec.error = Some(format!("setting the lab up: {e}"));
                Err(Box::new(rec))
            }
        }
    }

    fn set_up(&mut self) -> Result<(), FaultError> {
        if self.fault == Fault::DiskFullDest {
            for h in [HOST_A, HOST_B] {
                let dir = self.work_dir(h);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| FaultError::io(format!("creating {}", dir.display()), e))?;
                let out = Command::new("mount")
                    .args(["-t", "tmpfs", "-o"])
                    .arg(format!("size={DISK_SIZE},mode=0700"))
                    .arg("ferry-faults-disk")
                    .arg(&dir)
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| FaultError::io("running mount", e))?;
                if !out.status.success() {
                    return Err(FaultError::Failed(format!(
                        "mounting a tmpfs on {}: {}",
                        dir.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                self.disks.push(dir);
            }
        }
        let c = container();
        self.lab.add_container(HOST_A, c)?;
        self.lab.ferry_json(&[
            "public",
            "add",
            "--public",
            PUBLIC,
            "--container",
            CONTAINER,
        ])?;
        self.lab.sync()?;
        let bin = self.bin.to_string_lossy().into_owned();
        let port = PORT.to_string();
        let marker = copies::marker(self.lab.prefix(), c);
        self.lab.start_process_with_env(
            HOST_A,
            c,
            &[&bin, "serve", "--port", &port],
            &[(copies::MARKER_VAR, &marker)],
        )?;
        self.here = HOST_A.into();
        self.quiet()
    }

    /// The CRIU work directory of `host`'s agent (as the lab configures it).
    fn work_dir(&self, host: &str) -> PathBuf {
        self.lab.criu_work_dir(host)
    }

    fn copies(&self) -> Copies {
        copies::scan(self.lab.prefix(), &self.hosts, container())
    }

    /// Waits until the lab is ready for a cell: no active migration, one copy running where
    /// the endpoint is, and no other host keeping the container's namespace (the previous
    /// move's forwarding grace is over).
    fn quiet(&mut self) -> Result<(), FaultError> {
        let c = container();
        let deadline = Instant::now() + QUIET_TIMEOUT;
        loop {
            let o = self.observe(None);
            let copies = self.copies();
            let others: Vec<&String> = self
                .hosts
                .iter()
                .filter(|h| Some(h.as_str()) != copies.single_host())
                .filter(|h| self.lab.container_netns(h, c).exists())
                .collect();
            let last = match (&o, copies.single_host()) {
                (Ok(o), Some(h)) if !o.active && o.endpoint_host.as_deref() == Some(h) => {
                    if others.is_empty() {
                        self.here = h.to_owned();
                        return Ok(());
                    }
                    format!("namespaces left on {others:?}")
                }
                (Ok(o), _) => format!(
                    "active migration: {}, endpoint on {:?}, copies running on {:?}",
                    o.active,
                    o.endpoint_host,
                    copies.running_hosts()
                ),
                (Err(e), _) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(FaultError::Failed(format!(
                    "not settled within {QUIET_TIMEOUT:?}: {last}"
                )));
            }
            std::thread::sleep(TICK);
        }
    }

    /// The gateway's view: the run (if `id`), whether the container has an active migration,
    /// the migration `id`'s record, and where the endpoint is.
    fn observe(&self, id: Option<String>) -> Result<Observation, FaultError> {
        let ip = container();
        let (run, migs, eps) = self.lab.api(move |c| async move {
            let c = c.timeout(Duration::from_secs(3));
            let run = match &id {
                Some(id) => Some(c.run(id).await),
                None => None,
            };
            let migs = c.container_migrations(ip, false).await;
            let eps = c.endpoints().await;
            (run, migs, eps)
        })?;
        let api = |e: ApiError| FaultError::Failed(format!("gateway: {e}"));
        let migs: Vec<Migration> = migs.map_err(api)?;
        let eps: Vec<Endpoint> = eps.map_err(api)?;
        let run = match run {
            None => RunView::NoId,
            Some(Ok(r)) if r.state.finished() => RunView::Finished(Box::new(r)),
            Some(Ok(_)) => RunView::Running,
            Some(Err(e)) if e.status() == Some(404) => RunView::Lost,
            Some(Err(e)) => return Err(api(e)),
        };
        Ok(Observation {
            run,
            active: migs.iter().any(|m| m.phase.is_active()),
            migrations: migs,
            endpoint_host: eps.into_iter().find(|e| e.ip == ip).map(|e| e.host),
        })
    }

    fn run_cell(&mut self, p: &Progress, args: &FaultsArgs, phase: Phase, repeat: u32) -> Cell {
        self.cells += 1;
        let from = self.here.clone();
        let mut cell = Cell {
            fault: self.fault.name().into(),
            phase: phase.point().into(),
            repeat,
            outcome: RunState::NeedsAttention.as_str().into(),
            run_state: "unknown".into(),
            to: other(&from).into(),
            from,
            lab: self.lab.prefix().into(),
            ..Cell::default()
        };
        if let Err(e) = self.measure(p, args, phase, &mut cell) {
            cell.error = Some(match cell.error.take() {
                Some(before) => format!("{before}; {e}"),
                None => e.to_string(),
            });
        }
        let restarted = match self.fault {
            Fault::KillGatewayTakeover => self.lab.start_gateway(),
            Fault::KillEtcdMember | Fault::KillEtcdLeader => match self.killed_member.take() {
                Some(host) => self.lab.start_etcd_member(&host),
                None => Ok(()),
            },
            Fault::CutGatewayEtcd => self
                .gateway_host()
                .and_then(|h| self.lab.cut_from_etcd(&h, false))
                .and_then(|()| self.gateway_in_touch()),
            _ => Ok(()),
        };
        if let Err(e) = restarted {
            // The next cell would run without it: this lab is done.
            cell.error
                .get_or_insert(format!("starting what the fault killed again: {e}"));
        }
        if self.fault == Fault::DiskFullDest {
            for d in &self.disks {
                let _ = std::fs::remove_file(d.join(FILLER));
            }
        }
        if let Some(h) = &cell.ends_on {
            self.here = h.clone();
        }
        cell.judge();
        cell
    }

    fn measure(
        &mut self,
        p: &Progress,
        args: &FaultsArgs,
        phase: Phase,
        cell: &mut Cell,
    ) -> Result<(), FaultError> {
        let name = format!("{} at {}", self.fault.name(), phase.point());
        let handed_before = (self.fault == Fault::CutGatewayEtcd)
            .then(|| self.handed_over_count())
            .flatten();
        let client = self.start_client(args)?;
        let armed = Armed::arm(&self.lab.fault_dir(), phase.point())?;
        let mut cli = RunCli::spawn(&self.lab, &cell.to)?;
        p.say(format!(
            "{name}: migrating {} -> {}, waiting for point {:?}",
            cell.from,
            cell.to,
            phase.point()
        ));

        // Wait for the point (or for the run to end without reaching it).
        let reach_deadline = Instant::now() + REACH_TIMEOUT;
        let mut id = None;
        while Instant::now() < reach_deadline {
            if let Some(line) = armed.reached() {
                id = line.split_whitespace().nth(1).map(str::to_owned);
                cell.fault_landed = true;
                break;
            }
            if cli.exited().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        cell.run_id = id.clone();

        // The fault.
        let t_fault = Instant::now();
        let injected = if cell.fault_landed {
            self.inject(&armed, cell)
        } else {
            armed.disarm();
            Err(FaultError::Failed(format!(
                "the run never reached point {:?} (ferry migrate run: {})",
                phase.point(),
                cli.exited()
                    .map_or("still running".to_owned(), |c| format!("exit {c}"))
            )))
        };
        armed.disarm();
        let t_fault_end = Instant::now();
        if let Err(e) = injected {
            cell.fault_landed = false;
            cell.error = Some(e.to_string());
        } else {
            p.say(format!(
                "{name}: injected in {:.0} ms",
                ms(t_fault_end - t_fault)
            ));
        }

        // Converge.
        let deadline = t_fault_end + Duration::from_secs(args.converge_timeout_secs);
        let mut answered: Option<(f64, Instant)> = None; // (oldest owed ms, when read)
        let mut last_view = String::new();
        loop {
            while let Ok(v) = client.next_json(Stream::Stderr, Duration::ZERO) {
                if v["event"] == "progress" {
                    let oldest = v["oldest_outstanding_ms"].as_f64().unwrap_or(f64::MAX);
                    answered = Some((oldest, Instant::now()));
                }
            }
            let cli_done = cli.exited().is_some();
            let copies = self.copies();
            let seen = self.observe(id.clone());
            let client_ok = answered
                .is_some_and(|(oldest, at)| oldest < ANSWERED_MS && at.elapsed() < 3 * TICK);
            if let Ok(o) = &seen {
                let settled = match o.run {
                    RunView::Finished(_) => true,
                    RunView::Lost | RunView::NoId => cli_done,
                    RunView::Running => false,
                };
                let one = copies.single_host();
                last_view = format!(
                    "run {}, active migration {}, copies running on {:?}, endpoint on {:?}, \
                     client answered {client_ok}",
                    o.run.name(),
                    o.active,
                    copies.running_hosts(),
                    o.endpoint_host
                );
                if settled
                    && !o.active
                    && one.is_some()
                    && one == o.endpoint_host.as_deref()
                    && client_ok
                {
                    cell.converged = true;
                    cell.converge_ms = Some(ms(t_fault.elapsed()));
                    break;
                }
            }
            if Instant::now() >= deadline {
                p.say(format!(
                    "{name}: not converged within {} s: {last_view}",
                    args.converge_timeout_secs
                ));
                break;
            }
            std::thread::sleep(TICK);
        }

        // The run's own account.
        let (exit, stdout, stderr) = cli.finish(Duration::from_secs(10));
        cell.cli_exit = exit;
        let cli_report: Option<RunReport> = serde_json::from_str(stdout.trim()).ok();
        if cli_report.is_none() && exit != Some(0) {
            let said = format!("{} {}", stdout.trim(), stderr.trim());
            cell.error
                .get_or_insert(format!("ferry migrate run: exit {exit:?}: {}", said.trim()));
        }

        // The client's account.
        let (summary, _) = client.finish(Duration::from_secs(20))?;
        let n = |k: &str| summary[k].as_u64().unwrap_or(0);
        let connections = n("connections").max(1);
        cell.resets = n("resets");
        cell.mismatches = n("mismatches");
        cell.unanswered = n("unanswered");
        let max_seq = n("requests") / connections + 1;
        cell.bytes_lost = cell.unanswered * request_bytes(max_seq, PAYLOAD_BYTES);
        cell.gap_ms = summary["max_gap_ms"].as_f64();
        cell.public_reachable = self.probe();

        // Final readings.
        let copies = self.copies();
        cell.copies = copies.running_count();
        cell.stopped_copies = copies.stopped_count();
        cell.copy_hosts = copies.running_hosts();
        cell.ends_on = copies.single_host().map(str::to_owned);
        let seen = self.observe(id.clone())?;
        cell.endpoint_host = seen.endpoint_host.clone();
        cell.run_state = seen.run.name().into();
        let report = match seen.run {
            RunView::Finished(r) => Some(*r),
            _ => cli_report.filter(|r| r.state.finished()),
        };
        let record = id
            .as_ref()
            .and_then(|id| seen.migrations.iter().find(|m| &m.id == id));
        if matches!(
            self.fault,
            Fault::KillGatewayTakeover | Fault::CutGatewayEtcd
        ) {
            if let Some(before) = handed_before {
                cell.handed_over = self.handed_over_count().map(|n| n.saturating_sub(before));
            }
            cell.taken_over = Some(report.as_ref().is_some_and(|r| {
                r.events
                    .iter()
                    .any(|e| e.message.contains("takes the run over"))
            }));
        }
        if let Some(r) = &report {
            cell.outcome = r.state.as_str().into();
            cell.stopped_ms = (r.stopped_ms > 0.0).then_some(r.stopped_ms);
            if let Some(e) = &r.error {
                match &mut cell.error {
                    // Why the run ended before the fault's point: worth reading.
                    Some(x) if !cell.fault_landed => x.push_str(&format!("; the run: {e}")),
                    _ => {
                        cell.error.get_or_insert(e.clone());
                    }
                }
            }
        } else if let Some(m) = record.filter(|m| !m.phase.is_active()) {
            // No report (the run was refused, e.g. its prepare rolled back): the registry's
            // record of the migration is the outcome.
            cell.outcome = match m.phase {
                MigrationPhase::Released => RunState::Released,
                _ => RunState::RolledBack,
            }
            .as_str()
            .into();
        } else if cell.run_state == "lost" {
            cell.error
                .get_or_insert("the gateway no longer knows the run".into());
        }
        cell.status_host = status_host(report.as_ref(), record);
        Ok(())
    }

    /// The host of the lab's (main) gateway.
    fn gateway_host(&self) -> Result<String, LabError> {
        self.lab
            .control()
            .map(|c| c.host.clone())
            .ok_or_else(|| LabError::Ferry {
                args: String::new(),
                message: "this lab runs no gateway".into(),
            })
    }

    /// `GET path` on the main gateway, as the operator (`None`: no answer within 3 s).
    fn gateway_get(&self, path: &str) -> Option<ferry_api::transport::Response> {
        let cp = self.lab.control()?;
        let tls = cp.client_tls(ferry_lab::control::Party::Operator).ok()?;
        let (api, path) = (cp.api, path.to_owned());
        ferry_overlay::netns::run_in(&self.lab.netns(&cp.host), move || {
            ferry_api::transport::Request::get(path)
                .tls(tls)
                .timeout(Duration::from_secs(3))
                .send_blocking(api)
        })
        .ok()?
        .ok()
    }

    /// Waits (at most 30 s) until the main gateway answers without
    /// [`ferry_api::client::CUT_OFF_HEADER`]: back in touch with etcd's quorum, as a killed
    /// gateway is waited for until it is ready again.
    fn gateway_in_touch(&self) -> Result<(), LabError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.gateway_get("/v1/health").is_some_and(|r| {
                r.is_success() && !r.headers.contains_key(ferry_api::client::CUT_OFF_HEADER)
            }) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Ferry {
                    args: String::new(),
                    message: "the gateway is still cut off from etcd 30 s after the cut ended"
                        .into(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The main gateway's `ferry_gateway_store_events_total{kind="handed_over"}` (`None`: no
    /// answer).
    fn handed_over_count(&self) -> Option<u64> {
        let resp = self.gateway_get("/metrics")?;
        String::from_utf8_lossy(&resp.body)
            .lines()
            .find(|l| l.starts_with("ferry_gateway_store_events_total{kind=\"handed_over\"}"))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .map(|v| v as u64)
    }

    /// Injects the fault; `armed` is disarmed as the fault requires (after a kill, before
    /// the restart; right after a cut began; once the disk is full).
    fn inject(&mut self, armed: &Armed, cell: &Cell) -> Result<(), FaultError> {
        let host = |side: Side| match side {
            Side::Source => cell.from.clone(),
            Side::Dest => cell.to.clone(),
        };
        match self.fault {
            Fault::KillSourceAgent | Fault::KillDestAgent => {
                let h = host(if self.fault == Fault::KillSourceAgent {
                    Side::Source
                } else {
                    Side::Dest
                });
                let killed = self.lab.kill_agent(&h, libc::SIGKILL);
                armed.disarm();
                killed?;
                self.lab.start_agent(&h)?;
            }
            Fault::KillGateway | Fault::KillGatewayRestartEtcd => {
                let killed = self.lab.kill_gateway(libc::SIGKILL);
                armed.disarm();
                killed?;
                self.lab.start_gateway()?;
            }
            Fault::KillGatewayTakeover => {
                // Dead until the cell converged (see `run_cell`).
                let killed = self.lab.kill_gateway(libc::SIGKILL);
                armed.disarm();
                killed?;
            }
            Fault::KillEtcdMember => {
                // Dead until the cell converged (see `run_cell`).
                self.killed_member = Some(cell.from.clone());
                let killed = self.lab.kill_etcd_member(&cell.from);
                armed.disarm();
                killed?;
            }
            Fault::KillEtcdLeader => {
                // The leader as the members say it now (an election may be under way after
                // the last cell's restart: until one leads, asked again), dead until the
                // cell converged.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let leader = loop {
                    match self.lab.etcd_leader() {
                        Ok(Some(host)) => break Ok(host),
                        Ok(None) if std::time::Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Ok(None) => {
                            break Err(FaultError::io(
                                "finding etcd's leader",
                                std::io::Error::other("no member leads within 10 s"),
                            ));
                        }
                        Err(e) => break Err(e.into()),
                    }
                };
                let leader = match leader {
                    Ok(h) => h,
                    Err(e) => {
                        armed.disarm();
                        return Err(e);
                    }
                };
                self.killed_member = Some(leader.clone());
                let killed = self.lab.kill_etcd_member(&leader);
                armed.disarm();
                killed?;
            }
            Fault::CutGatewayEtcd => {
                // Cut until the cell converged (see `run_cell`).
                let h = self.gateway_host()?;
                let cut = self.lab.cut_from_etcd(&h, true);
                armed.disarm();
                cut?;
            }
            Fault::DiskFullDest => {
                let filled = fill(&self.work_dir(&cell.to).join(FILLER));
                armed.disarm();
                filled?;
            }
            _ => {
                let (side, length) = self.fault.cut().expect("a link cut");
                let h = host(side);
                let down = self.link(&h, false);
                armed.disarm();
                down?;
                // The cut's length is the fault itself: the one timed wait of the harness.
                std::thread::sleep(length);
                self.link(&h, true)?;
            }
        }
        Ok(())
    }

    /// Sets `host`'s underlay port (its veth on the cloud's bridge, in the router) up or down.
    fn link(&self, host: &str, up: bool) -> Result<(), FaultError> {
        let dev = format!("v-{host}");
        let state = if up { "up" } else { "down" };
        let out = self
            .lab
            .exec(ROUTER, &["ip", "link", "set", "dev", &dev, state])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(FaultError::Failed(format!(
                "ip link set {dev} {state}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// The cell's client through the public address, answered at least once.
    fn start_client(&self, args: &FaultsArgs) -> Result<Workload, FaultError> {
        let progress = PROGRESS_MS.to_string();
        let client_args = crate::workload::client_args(
            &format!("{PUBLIC}:{PORT}"),
            args.connections,
            args.interval_ms,
            &["--progress-ms", &progress],
        );
        let client_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
        let inet = self.lab.netns(ferry_lab::INET);
        let client = Workload::start_connected(&self.bin, &inet, &client_args, |_, _| {})?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = client.next_json(
                Stream::Stderr,
                deadline.saturating_duration_since(Instant::now()),
            )?;
            if v["event"] == "progress" && v["replies"].as_u64().unwrap_or(0) > 0 {
                return Ok(client);
            }
        }
    }

    /// A fresh client through the public address: connected and every reply right.
    fn probe(&self) -> bool {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "client",
            "--to",
            &format!("{PUBLIC}:{PORT}"),
            "--connections",
            "1",
            "--interval-ms",
            "5",
            "--duration-ms",
            "300",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if ferry_overlay::netns::command_in(&mut cmd, &self.lab.netns(ferry_lab::INET)).is_err() {
            return false;
        }
        cmd.output().is_ok_and(|o| o.status.success())
    }

    /// Tears the lab down (unmounting its disks first) and checks what it left.
    fn retire(mut self, p: &Progress) -> LabRecord {
        let prefix = self.lab.prefix().to_owned();
        let mut errors = Vec::new();
        for d in std::mem::take(&mut self.disks) {
            if let Err(e) = ferry_lab::teardown::detach_mount(&d) {
                errors.push(format!("unmounting {}: {e}", d.display()));
            }
        }
        p.say(format!("{}: tearing lab {prefix} down", self.fault.name()));
        if let Err(e) = self.lab.down() {
            errors.push(format!("teardown: {e}"));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let left = loop {
            let left = leftovers(&prefix);
            if left.is_empty() || Instant::now() >= deadline {
                break left;
            }
            std::thread::sleep(TICK);
        };
        LabRecord {
            prefix,
            fault: self.fault.name().into(),
            cells: self.cells,
            leftovers: left,
            replaced: None,
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        }
    }
}

/// Where the run report says the container is (released: `to`, rolled back: `from`), else
/// where the migration's record says (released / aborted).
pub fn status_host(report: Option<&RunReport>, record: Option<&Migration>) -> Option<String> {
    match report.map(|r| r.state) {
        Some(RunState::Released) => return report.map(|r| r.to.clone()),
        Some(RunState::RolledBack) => return report.map(|r| r.from.clone()),
        _ => {}
    }
    record.and_then(|m| match m.phase {
        MigrationPhase::Released => Some(m.to.clone()),
        MigrationPhase::Aborted => Some(m.from.clone()),
        _ => None,
    })
}

/// What the gateway says about a run.
enum RunView {
    /// No run id known (the point was never reached).
    NoId,
    Running,
    Finished(Box<RunReport>),
    /// The gateway does not know the run (404): it lost it.
    Lost,
}

impl RunView {
    fn name(&self) -> &'static str {
        match self {
            RunView::NoId => "unknown",
            RunView::Running => "running",
            RunView::Finished(r) => r.state.as_str(),
            RunView::Lost => "lost",
        }
    }
}

struct Observation {
    run: RunView,
    active: bool,
    migrations: Vec<Migration>,
    endpoint_host: Option<String>,
}

/// An armed fault point; disarmed (its file removed) at the latest when dropped.
struct Armed {
    file: PathBuf,
    reached: PathBuf,
}

impl Armed {
    fn arm(dir: &Path, point: &str) -> Result<Self, FaultError> {
        let file = dir.join(point);
        let reached = file.with_extension("reached");
        match std::fs::remove_file(&reached) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(FaultError::io(format!("removing {}", reached.display()), e));
            }
            _ => {}
        }
        std::fs::write(&file, b"armed by ferry-lab bench faults\n")
            .map_err(|e| FaultError::io(format!("arming {}", file.display()), e))?;
        Ok(Self { file, reached })
    }

    /// The `.reached` line (`PID MIGRATION`), once a process reached the point.
    fn reached(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.reached).ok()?;
        text.contains('\n').then(|| text.trim().to_owned())
    }

    fn disarm(&self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.disarm();
        let _ = std::fs::remove_file(&self.reached);
    }
}

/// `ferry --json migrate run` running in the background (inside the gateway host, pointed at
/// the lab's gateway); SIGKILLed and reaped if dropped while it runs.
struct RunCli {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    status: Option<i32>,
}

impl RunCli {
    fn spawn(lab: &Lab, to: &str) -> Result<Self, FaultError> {
        let cp = lab
            .control()
            .ok_or_else(|| FaultError::Failed("the lab has no gateway".into()))?;
        let bin = find_binary("ferry", "ferry-cli")?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "--json",
            "migrate",
            "run",
            "--quiet",
            "--container",
            CONTAINER,
            "--to",
            to,
        ])
        .envs(cp.cli_env())
        .env("RUST_LOG", "warn")
        .env_remove(ferry_api::faultpoint::ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        ferry_overlay::netns::command_in(&mut cmd, &lab.netns(&cp.host)).map_err(LabError::from)?;
        let mut child = cmd
            .spawn()
            .map_err(|e| FaultError::io("spawning ferry migrate run", e))?;
        let read_all = |mut r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                let _ = tx.send(s);
            });
            rx
        };
        let out = read_all(Box::new(child.stdout.take().expect("piped")));
        let err = read_all(Box::new(child.stderr.take().expect("piped")));
        Ok(Self {
            child,
            out,
            err,
            status: None,
        })
    }

    /// Its exit code, once it exited (-1: killed by a signal).
    fn exited(&mut self) -> Option<i32> {
        if self.status.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.status = Some(s.code().unwrap_or(-1));
        }
        self.status
    }

    /// Waits up to `timeout` for it to exit (else SIGKILL: `None`); its exit code, stdout and
    /// stderr.
    fn finish(mut self, timeout: Duration) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + timeout;
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let exit = self.exited();
        if exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let wait = Duration::from_secs(5);
        let out = self.out.recv_timeout(wait).unwrap_or_default();
        let err = self.err.recv_timeout(wait).unwrap_or_default();
        (exit, out, err)
    }
}

impl Drop for RunCli {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Fills the file system holding `path` to the last byte by writing `path` until ENOSPC.
fn fill(path: &Path) -> Result<(), FaultError> {
    let mut f = std::fs::File::create(path)
        .map_err(|e| FaultError::io(format!("creating {}", path.display()), e))?;
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FaultError::io(format!("filling {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::run::LockMode;

    fn report(state: RunState) -> RunReport {
        RunReport {
            id: "m1".into(),
            container: container(),
            from: "a1".into(),
            to: "b1".into(),
            lock: LockMode::Hold,
            memory: Default::default(),
            state,
            started_unix_ms: 0.0,
            total_ms: 0.0,
            stopped_ms: 0.0,
            phases: Vec::new(),
            events: Vec::new(),
            criu: None,
            image_bytes: 0,
            image_bytes_during_dump: 0,
            error: None,
        }
    }

    fn record(phase: MigrationPhase) -> Migration {
        Migration::new("m1", container(), "a1", "b1", phase)
    }

    #[test]
    fn the_status_names_a_host_only_for_a_finished_move() {
        let released = report(RunState::Released);
        let rolled = report(RunState::RolledBack);
        let attention = report(RunState::NeedsAttention);
        assert_eq!(status_host(Some(&released), None).as_deref(), Some("b1"));
        assert_eq!(status_host(Some(&rolled), None).as_deref(), Some("a1"));
        assert_eq!(status_host(Some(&attention), None), None);
        let aborted = record(MigrationPhase::Aborted);
        let frozen = record(MigrationPhase::Frozen);
        assert_eq!(
            status_host(Some(&attention), Some(&aborted)).as_deref(),
            Some("a1")
        );
        assert_eq!(status_host(None, Some(&frozen)), None);
        assert_eq!(
            status_host(None, Some(&record(MigrationPhase::Released))).as_deref(),
            Some("b1")
        );
    }

    #[test]
    fn armed_points_are_files_and_disarm_on_drop() {
        let dir = tempfile_dir();
        let a = Armed::arm(&dir, "dump").unwrap();
        assert!(dir.join("dump").exists());
        assert_eq!(a.reached(), None);
        std::fs::write(dir.join("dump.reached"), "123 m7\n").unwrap();
        assert_eq!(a.reached().as_deref(), Some("123 m7"));
        drop(a);
        assert!(!dir.join("dump").exists());
        assert!(!dir.join("dump.reached").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ferry-faults-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn filling_stops_at_the_end_of_the_disk() {
        // /dev/full answers every write with ENOSPC.
        assert!(fill(Path::new("/dev/full")).is_ok());
    }
}
