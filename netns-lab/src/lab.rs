//! Bringing a lab up: namespaces, the router's bridges, veths, addresses, routes, the agents,
//! and the reaper that tears the lab down if its owner dies.

use std::{
    net::SocketAddr,
    os::unix::{fs::DirBuilderExt as _, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant, SystemTime},
};

use ferry_api::HostRole;
use ferry_config::{AgentConfig, DEFAULT_METRICS_LISTEN, DEFAULT_VXLAN_DEVICE, Peer};
use ferry_overlay::netns::{command_in, netns_path, run_in};

use crate::{
    LabError, TeardownError,
    bins::find_binary,
    control::ControlPlane,
    procs::{self, ProcRecord},
    state::{self, BPFFS_ROOT, LabState},
    teardown::teardown,
    topology::{Host, LabTopology, Role, Topology},
    wan,
};

/// With a standby and `public6`: the gateway-role hosts' own IPv6 addresses on the internet
/// segment start this far after the gateway address (which moves to the facing host).
const FLOATING6_OWN: u128 = 0x10;

/// The next hop the internet's client routes the overlay's IPv6 through, when it moves between
/// gateway-role hosts: with `public6` and at least one standby.
fn public6_next_hop(inet: &crate::topology::Internet) -> Option<std::net::Ipv6Addr> {
    let v6 = inet.ipv6.as_ref()?;
    (inet.public6 && !inet.standby.is_empty()).then_some(v6.gateway_address)
}

/// The nftables table of [`Lab::cut_from_etcd`] in a host's namespace.
const ETCD_CUT_TABLE: &str = "ferry_lab_etcd_cut";

/// Name of the router node (and of its namespace suffix).
pub const ROUTER: &str = "router";
/// Name of the internet client node.
pub const INET: &str = "inet";
/// Host-side interface of a host's link to its cloud.
pub const HOST_IF: &str = "eth0";
/// The gateway's interface facing the internet.
pub const PUBLIC_IF: &str = "pub0";
/// The internet's segment when several hosts face it: a bridge in the client's namespace.
pub const INET_BRIDGE: &str = "br-inet";
/// How long agents get to serve their metrics endpoint.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Port of the agents' peer API (hand-off packages), on each host's underlay address.
pub const AGENT_API_PORT: u16 = ferry_config::DEFAULT_API_PORT;
/// The recorded kind of the links' forwarder process (`ferry-lab wan-forward`).
pub const WAN_FORWARDER: &str = "wan-forwarder";
/// How long the links' forwarder gets to open its TUN devices and answer.
pub const WAN_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// What to bring up (default: the built-in topology, no agents).
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    pub topology: Topology,
    /// Start a `ferry-agent` in every host (including the gateway) and wait for its metrics.
    pub start_agents: bool,
    /// The agents' hold-queue limits.
    pub hold_limits: ferry_config::HoldLimits,
    /// The control plane in plain HTTP (no TLS material): for the with/without-TLS
    /// benchmarks only.
    pub insecure_plaintext: bool,
}

/// A running lab. Dropping it tears it down (best effort, errors logged); [`Lab::down`] tears
/// it down and reports errors.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    topology: LabTopology,
    children: Vec<Child>,
    up_duration: Duration,
    detached: bool,
}

/// `<prefix>-<node>`: the namespace name of a lab node.
pub fn netns_name(prefix: &str, node: &str) -> String {
    format!("{prefix}-{node}")
}

/// The lab's nodes, in creation order: the router, every host, then the internet client.
pub fn nodes(topology: &LabTopology) -> Vec<String> {
    let mut v = vec![ROUTER.to_owned()];
    v.extend(topology.hosts.iter().map(|h| h.name.clone()));
    if topology.internet.is_some() {
        v.push(INET.to_owned());
    }
    v
}

impl Lab {
    /// Brings a lab up; a reaper tears it down if this process dies without doing so.
    pub fn up(opts: LabOptions) -> Result<Self, LabError> {
        Self::up_inner(opts, false)
    }

    /// Brings up a lab that outlives this process (no reaper): what `ferry-lab up` does.
    /// Use [`Lab::detach`] to leave it running.
    pub fn up_persistent(opts: LabOptions) -> Result<Self, LabError> {
        Self::up_inner(opts, true)
    }

    fn up_inner(opts: LabOptions, persistent: bool) -> Result<Self, LabError> {
        let t0 = Instant::now();
        if !procs::is_root() {
            return Err(LabError::NotRoot);
        }
        let topology = opts.topology.resolve()?;
        // Find the binaries before touching anything.
        let reaper_bin = if persistent {
            None
        } else {
            Some(find_binary("ferry-lab", "ferry-lab-cli")?)
        };
        let agent_bin = if opts.start_agents {
            Some(find_binary("ferry-agent", "ferry-agent")?)
        } else {
            None
        };
        // With agents and a gateway host, the gateway daemon (registry) runs too.
        let ferry_bin = if opts.start_agents && topology.internet.is_some() {
            Some(find_binary("ferry", "ferry-cli")?)
        } else {
            None
        };
        // Shaped links: the forwarder is `ferry-lab wan-forward`.
        let wan_bin = if topology.links.is_empty() {
            None
        } else {
            Some(find_binary("ferry-lab", "ferry-lab-cli")?)
        };

        let prefix = create_state_dir()?;
        let mut b = Builder {
            state: LabState {
                prefix: prefix.clone(),
                persistent,
                owner_pid: std::process::id() as i32,
                created_unix_secs: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                agents: opts.start_agents,
                hold_limits: opts.hold_limits,
                insecure_plaintext: opts.insecure_plaintext,
                topology: topology.clone(),
                namespaces: Vec::new(),
                processes: Vec::new(),
            },
            children: Vec::new(),
        };
        let _span = tracing::info_span!("lab", %prefix).entered();
        let result = b.build(
            reaper_bin.as_deref(),
            wan_bin.as_deref(),
            agent_bin.as_deref(),
            ferry_bin.as_deref(),
        );
        let mut lab = Self {
            prefix,
            topology,
            children: std::mem::take(&mut b.children),
            up_duration: Duration::ZERO,
            detached: false,
        };
        if let Err(error) = result {
            tracing::error!(%error, "bringing the lab up failed: tearing it down");
            lab.detached = true; // torn down here, not again on drop
            return Err(match lab.teardown_now() {
                Ok(()) => error,
                Err(teardown) => LabError::UpAndTeardown {
                    error: Box::new(error),
                    teardown,
                },
            });
        }
        lab.up_duration = t0.elapsed();
        tracing::info!(
            elapsed_ms = lab.up_duration.as_millis() as u64,
            agents = opts.start_agents,
            "lab up"
        );
        Ok(lab)
    }

    /// The lab's unique prefix (`fl` + 6 hex digits).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The resolved topology (every address).
    pub fn topology(&self) -> &LabTopology {
        &self.topology
    }

    /// How long [`Lab::up`] took.
    pub fn up_duration(&self) -> Duration {
        self.up_duration
    }

    /// The lab's state directory (`/run/ferry-lab/<prefix>`).
    pub fn state_dir(&self) -> PathBuf {
        state::state_dir(&self.prefix)
    }

    /// The fault-point directory the lab's gateway and agents watch (`FERRY_FAULT_DIR`; see
    /// `ferry_api::faultpoint`).
    pub fn fault_dir(&self) -> PathBuf {
        state::fault_dir(&self.prefix)
    }

    /// Log file of a host's agent.
    pub fn agent_log(&self, host: &str) -> PathBuf {
        self.state_dir().join(host).join("agent.log")
    }

    /// A host's CRIU work directory (images, CRIU's logs): [`state::criu_work_dir`].
    pub fn criu_work_dir(&self, host: &str) -> PathBuf {
        state::criu_work_dir(self.prefix(), host)
    }

    /// The hand-off socket of a host's agent (`/run/ferry-lab/<prefix>/<host>/handoff.sock`).
    pub fn handoff_socket(&self, host: &str) -> PathBuf {
        handoff_socket(&self.prefix, host)
    }

    /// Names of the lab's nodes: `router`, the hosts, `inet` (if the topology has an internet).
    pub fn nodes(&self) -> Vec<String> {
        nodes(&self.topology)
    }

    /// The CNI socket of a host's agent (`/run/ferry-lab/<prefix>/<host>/cni.sock`).
    pub fn cni_socket(&self, host: &str) -> PathBuf {
        cni_socket(&self.prefix, host)
    }

    /// Namespace name of a node (a host name, `router` or `inet`).
    pub fn netns_name(&self, node: &str) -> String {
        netns_name(&self.prefix, node)
    }

    /// Path of a node's namespace (`/run/netns/<prefix>-<node>`).
    pub fn netns(&self, node: &str) -> PathBuf {
        netns_path(&self.netns_name(node))
    }

    /// A host's addresses.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.topology.host(name)
    }

    /// PID of the links' forwarder, if the lab has links (from its state).
    pub fn forwarder_pid(&self) -> Result<Option<i32>, LabError> {
        Ok(self
            .load_state()?
            .processes
            .iter()
            .find(|p| p.kind == WAN_FORWARDER)
            .map(|p| p.pid))
    }

    /// The lab's shaped links between clouds.
    pub fn links(&self) -> &[crate::topology::Link] {
        &self.topology.links
    }

    /// Every direction of every shaped link with its forwarder's counters (read, dropped at
    /// the bottleneck, lost, held, written back, dropped by the kernel before it read them).
    pub fn link_stats(&self) -> Result<Vec<wan::DirectionStats>, LabError> {
        let plan = wan::plan(&self.topology);
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let socket = wan::stats_socket(&self.state_dir());
        let fwd = wan::query_stats(&socket).map_err(|e| LabError::WanForwarder {
            problem: format!("does not answer on {}: {e}", socket.display()),
            tail: tail(&wan::log_path(&self.state_dir()), 20),
            log: wan::log_path(&self.state_dir()),
        })?;
        let v = plan
            .into_iter()
            .map(|d| wan::DirectionStats {
                forwarder: fwd
                    .directions
                    .iter()
                    .find(|c| c.tun == d.tun)
                    .cloned()
                    .unwrap_or_default(),
                plan: d,
            })
            .collect();
        Ok(v)
    }

    fn check_node(&self, node: &str) -> Result<(), LabError> {
        let nodes = self.nodes();
        if nodes.iter().any(|n| n == node) {
            Ok(())
        } else {
            Err(LabError::UnknownNode {
                prefix: self.prefix.clone(),
                name: node.to_owned(),
                known: nodes.join(", "),
            })
        }
    }

    /// Runs a command inside a node's namespace (the mount namespace stays ours) and captures
    /// its output. `args[0]` is the program.
    pub fn exec(&self, node: &str, args: &[&str]) -> Result<Output, LabError> {
        self.check_node(node)?;
        let (program, rest) = args.split_first().ok_or_else(|| {
            LabError::io(
                format!("exec in {node}"),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
            )
        })?;
        let mut cmd = Command::new(program);
        cmd.args(rest).stdin(Stdio::null());
        command_in(&mut cmd, &self.netns(node))?;
        cmd.output()
            .map_err(|e| LabError::io(format!("running {args:?} in {node}"), e))
    }

    /// Can `from` ping `to_ip`? Up to 3 echo requests, 1 s each; true at the first reply.
    pub fn ping(&self, from: &str, to_ip: &str) -> bool {
        (0..3).any(|_| {
            self.exec(from, &["ping", "-n", "-q", "-c", "1", "-W", "1", to_ip])
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
    }

    /// Runs a command inside any namespace of this lab (e.g. a container's) and captures its
    /// output. Refuses paths outside the lab.
    pub fn exec_in(&self, netns: &Path, args: &[&str]) -> Result<Output, LabError> {
        let mine = netns
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{}-", self.prefix)));
        let (program, rest) = match args.split_first() {
            Some(x) if mine => x,
            _ => {
                return Err(LabError::io(
                    format!("exec in {}", netns.display()),
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "empty command, or a namespace that is not this lab's",
                    ),
                ));
            }
        };
        let mut cmd = Command::new(program);
        cmd.args(rest).stdin(Stdio::null());
        command_in(&mut cmd, netns)?;
        cmd.output()
            .map_err(|e| LabError::io(format!("running {args:?} in {}", netns.display()), e))
    }

    /// The lab's control plane (gateway daemon, token), if the topology has a gateway.
    pub fn control(&self) -> Option<ControlPlane> {
        ControlPlane::of(&self.prefix, &self.topology)
    }

    fn control_or_err(&self) -> Result<ControlPlane, LabError> {
        self.control().ok_or_else(|| LabError::Ferry {
            args: String::new(),
            message: "this lab's topology has no gateway (no [internet] section)".into(),
        })
    }

    /// Runs the `ferry` CLI inside the gateway host's namespace, pointed at the lab's gateway
    /// (FERRY_GATEWAY, FERRY_TOKEN_FILE), and captures its output.
    pub fn ferry(&self, args: &[&str]) -> Result<Output, LabError> {
        self.ferry_command(args)?
            .output()
            .map_err(|e| LabError::io(format!("running ferry {args:?}"), e))
    }

    /// The command [`Self::ferry`] runs, for a caller that spawns it and does something
    /// while it runs (stdout and stderr piped).
    pub fn ferry_command(&self, args: &[&str]) -> Result<Command, LabError> {
        let cp = self.control_or_err()?;
        self.ferry_command_from(&cp.host, args)
    }

    /// [`Self::ferry`] from `host`'s namespace (the gateway host may be down).
    pub fn ferry_from(&self, host: &str, args: &[&str]) -> Result<Output, LabError> {
        self.ferry_command_from(host, args)?
            .output()
            .map_err(|e| LabError::io(format!("running ferry {args:?} on {host}"), e))
    }

    /// [`Self::ferry_command`] from `host`'s namespace.
    pub fn ferry_command_from(&self, host: &str, args: &[&str]) -> Result<Command, LabError> {
        let cp = self.control_or_err()?;
        let bin = find_binary("ferry", "ferry-cli")?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .envs(cp.cli_env())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command_in(&mut cmd, &self.netns(host))?;
        Ok(cmd)
    }

    /// Runs `ferry --json ARGS`; an error (with the CLI's message) unless it exits 0.
    pub fn ferry_json(&self, args: &[&str]) -> Result<serde_json::Value, LabError> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ferry(&all)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(LabError::Ferry {
                args: args.join(" "),
                message: format!(
                    "{} {}",
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        serde_json::from_str(stdout.trim()).map_err(|e| LabError::Ferry {
            args: args.join(" "),
            message: format!("unparseable output {stdout:?}: {e}"),
        })
    }

    /// Runs `f` with an API client of the lab's gateway, on a thread inside the gateway host's
    /// namespace (the API listens on the lab's underlay) with a current-thread runtime.
    pub fn api<T, F, Fut>(&self, f: F) -> Result<T, LabError>
    where
        F: FnOnce(ferry_api::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let cp = self.control_or_err()?;
        let client = ferry_api::Client::with_token_file(cp.api, &cp.token_file)
            .map_err(|e| LabError::Ferry {
                args: "(api)".into(),
                message: e.to_string(),
            })?
            .with_fallbacks(&cp.fallbacks)
            .with_tls(cp.client_tls(crate::control::Party::Operator)?);
        run_in(&self.netns(&cp.host), move || {
            ferry_api::transport::block_on(f(client))
        })?
        .map_err(|e| LabError::io("starting a runtime for the API client", e))
    }

    /// Waits until every agent has applied the registry's current version (`ferry sync`).
    pub fn sync(&self) -> Result<(), LabError> {
        self.ferry_json(&["sync", "--timeout-ms", "15000"])
            .map(|_| ())
    }

    /// Namespace path of the container with address `ip` on `host` (as that host's agent
    /// names it).
    pub fn container_netns(&self, host: &str, ip: std::net::Ipv4Addr) -> PathBuf {
        netns_path(&ferry_config::container_netns_name(
            &container_netns_prefix(&self.prefix, host),
            ip,
        ))
    }

    /// Registers a container endpoint on `host` through the gateway, waits until every agent
    /// applied it, and returns the container's namespace.
    pub fn add_container(&self, host: &str, ip: std::net::Ipv4Addr) -> Result<PathBuf, LabError> {
        self.ferry_json(&["endpoint", "add", "--ip", &ip.to_string(), "--host", host])?;
        self.sync()?;
        let ns = self.container_netns(host, ip);
        if !ns.exists() {
            return Err(LabError::Ferry {
                args: format!("endpoint add --ip {ip} --host {host}"),
                message: format!(
                    "the agent of {host} applied the change but {} does not exist",
                    ns.display()
                ),
            });
        }
        Ok(ns)
    }

    /// Stops the gateway daemon (SIGTERM, by PID) and starts it again with the same
    /// configuration and state directory; waits until it answers.
    pub fn restart_gateway(&mut self) -> Result<(), LabError> {
        self.restart_gateway_with(libc::SIGTERM)
    }

    /// [`Lab::restart_gateway`] with `signal` (SIGKILL: a crash).
    pub fn restart_gateway_with(&mut self, signal: i32) -> Result<(), LabError> {
        self.kill_gateway(signal)?;
        self.start_gateway()
    }

    /// Sends `signal` to the gateway daemon (by PID and start time) and waits until it exited
    /// (at most 5 s; a SIGTERM still unanswered then is followed by SIGKILL). SIGKILL is a
    /// crash: nothing of its memory (e.g. its run reports) survives, its state directory does.
    pub fn kill_gateway(&mut self, signal: i32) -> Result<(), LabError> {
        let cp = self.control_or_err()?;
        self.stop_recorded("gateway", None, signal, Duration::from_secs(5))
            .map_err(|problem| LabError::GatewayFailed {
                problem: format!("did not stop: {problem}"),
                tail: tail(&cp.log, 20),
                log: cp.log.clone(),
            })
    }

    /// Sends `signal` to the lab's recorded processes of `kind` (on `host`, if given), by
    /// PID and start time through a pidfd; waits `grace` for each to exit, then SIGKILL and
    /// 5 s more; forgets them in the lab's state. Err: what went wrong, in words.
    fn stop_recorded(
        &mut self,
        kind: &str,
        host: Option<&str>,
        signal: i32,
        grace: Duration,
    ) -> Result<(), String> {
        let mut st = self.load_state().map_err(|e| e.to_string())?;
        let ours = |p: &ProcRecord| p.kind == kind && (host.is_none() || p.host.as_deref() == host);
        let mut problems = Vec::new();
        for r in st.processes.iter().filter(|p| ours(p)) {
            let what = |e: std::io::Error| format!("signal {signal} to PID {}: {e}", r.pid);
            let fd = match procs::PidFd::open(r.pid, Some(r.start_time)) {
                Ok(Some(fd)) => fd,
                Ok(None) => continue,
                Err(e) => {
                    problems.push(what(e));
                    continue;
                }
            };
            match fd.signal(signal).and_then(|()| fd.wait_exit(Some(grace))) {
                Ok(true) => {}
                Ok(false) => {
                    let killed = fd
                        .signal(libc::SIGKILL)
                        .and_then(|()| fd.wait_exit(Some(Duration::from_secs(5))));
                    if !matches!(killed, Ok(true)) {
                        problems.push(format!("PID {} survived SIGKILL for 5 s", r.pid));
                    }
                }
                Err(e) => problems.push(what(e)),
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        for c in &mut self.children {
            let _ = c.try_wait();
        }
        st.processes.retain(|p| !ours(p));
        st.save().map_err(|e| e.to_string())
    }

    /// Starts the gateway daemon (after [`Lab::kill_gateway`]) with the same configuration and
    /// state directory; waits until it answers.
    pub fn start_gateway(&mut self) -> Result<(), LabError> {
        let cp = self.control_or_err()?;
        let bin = find_binary("ferry", "ferry-cli")?;
        let mut child = cp.spawn(&self.prefix, &bin)?;
        self.record_started(&child, "gateway", &cp.host)?;
        let ready = cp.wait_ready(&self.prefix, &mut child);
        self.children.push(child);
        ready
    }

    /// The gateways' client configuration towards this lab's etcd (`None`: plain HTTP).
    pub fn etcd_client_tls(
        &self,
    ) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, LabError> {
        etcd_client_tls(&self.prefix)
    }

    /// The host whose etcd member leads (topology `etcd`): each member's
    /// `/v3/maintenance/status` names the leader's id and its own; the one whose own id is the
    /// leader's, as that member says. `None` while no member answers as leader (an election).
    pub fn etcd_leader(&self) -> Result<Option<String>, LabError> {
        let tls = etcd_client_tls(&self.prefix)?;
        for (name, client) in crate::control::etcd_members(&self.topology) {
            let ns = self.netns(&name);
            let tls = tls.clone();
            let answer = run_in(&ns, move || {
                ferry_api::transport::Request::post("/v3/maintenance/status")
                    .tls(tls)
                    .json(b"{}".to_vec())
                    .timeout(Duration::from_secs(2))
                    .send_blocking(client)
            })?;
            let Ok(answer) = answer else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&answer.body) else {
                continue;
            };
            let own = v["header"]["member_id"].as_str();
            if own.is_some() && own == v["leader"].as_str() {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// SIGKILLs the etcd member on `host` (topology `etcd`) and waits until it exited.
    pub fn kill_etcd_member(&mut self, host: &str) -> Result<(), LabError> {
        self.stop_recorded("etcd", Some(host), libc::SIGKILL, Duration::from_secs(5))
            .map_err(|e| {
                LabError::io(
                    format!("stopping the etcd member on {host}"),
                    std::io::Error::other(e),
                )
            })
    }

    /// Cuts `host` off from etcd (`cut`), or ends the cut: in its namespace, TCP between any
    /// other address and etcd's client and peer ports (either end's) is refused with a reset,
    /// both ways, connections already open included (a stream the other side opened would
    /// otherwise still carry the leader's appends out and their acknowledgements in). So its
    /// gateway reaches only the member on `host` (if there is one), and that member loses its
    /// peers: it has no quorum. Everything else (agents, VXLAN, the public side) still flows:
    /// the gateway is alive and answering, only etcd is out of its reach.
    pub fn cut_from_etcd(&self, host: &str, cut: bool) -> Result<(), LabError> {
        let h = self.topology.host(host).ok_or_else(|| {
            LabError::io(
                format!("cutting {host} from etcd"),
                std::io::Error::other("not a host of this lab"),
            )
        })?;
        let (client, peer) = (
            crate::control::ETCD_CLIENT_PORT,
            crate::control::ETCD_PEER_PORT,
        );
        let ruleset = format!(
            "table inet {ETCD_CUT_TABLE} {{\n\
             chain out {{ type filter hook output priority 0; policy accept;\n\
             ip daddr != {{ {a}, 127.0.0.0/8 }} tcp dport {{ {client}, {peer} }} reject with tcp reset\n\
             ip daddr != {{ {a}, 127.0.0.0/8 }} tcp sport {{ {client}, {peer} }} reject with tcp reset\n}}\n\
             chain in {{ type filter hook input priority 0; policy accept;\n\
             ip saddr != {{ {a}, 127.0.0.0/8 }} tcp dport {{ {client}, {peer} }} reject with tcp reset\n\
             ip saddr != {{ {a}, 127.0.0.0/8 }} tcp sport {{ {client}, {peer} }} reject with tcp reset\n}}\n\
             }}\n",
            a = h.address
        );
        let out = if cut {
            let file = state::state_dir(&self.prefix).join(format!("etcd-cut-{host}.nft"));
            std::fs::write(&file, ruleset)
                .map_err(|e| LabError::io(format!("writing {}", file.display()), e))?;
            self.exec(host, &["nft", "-f", &file.to_string_lossy()])?
        } else {
            // No cut (the fault never landed): nothing to end.
            let listed = self.exec(host, &["nft", "list", "table", "inet", ETCD_CUT_TABLE])?;
            if !listed.status.success() {
                return Ok(());
            }
            self.exec(host, &["nft", "delete", "table", "inet", ETCD_CUT_TABLE])?
        };
        if out.status.success() {
            Ok(())
        } else {
            Err(LabError::io(
                format!(
                    "{} {host}'s cut from etcd",
                    if cut { "making" } else { "ending" }
                ),
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            ))
        }
    }

    /// Starts the etcd member on `host` again from its data; waits until it is healthy.
    pub fn start_etcd_member(&mut self, host: &str) -> Result<(), LabError> {
        self.start_etcd_members(&[host])
    }

    /// Starts the etcd members on `hosts` again from their data, all before waiting for any
    /// (a member is healthy only once a quorum of them runs); waits until each is healthy.
    pub fn start_etcd_members(&mut self, hosts: &[&str]) -> Result<(), LabError> {
        for host in hosts {
            let child = etcd_member_command(&self.prefix, &self.topology, host)?
                .spawn()
                .map_err(|e| LabError::io("spawning etcd", e))?;
            let recorded = self.record_started(&child, "etcd", host);
            self.children.push(child);
            recorded?;
        }
        for host in hosts {
            wait_etcd_member(&self.prefix, &self.topology, host)?;
        }
        Ok(())
    }

    /// The extra gateway on `host` (topology `extra_gateways`).
    pub fn extra_gateway(&self, host: &str) -> Result<ControlPlane, LabError> {
        ControlPlane::extra(&self.prefix, &self.topology, host).ok_or_else(|| LabError::Ferry {
            args: String::new(),
            message: format!("this lab runs no extra gateway on {host:?}"),
        })
    }

    /// Sends `signal` to the extra gateway on `host` and waits until it exited.
    pub fn kill_extra_gateway(&mut self, host: &str, signal: i32) -> Result<(), LabError> {
        self.extra_gateway(host)?;
        self.stop_recorded("gateway-extra", Some(host), signal, Duration::from_secs(5))
            .map_err(|e| {
                LabError::io(
                    format!("stopping the gateway on {host}"),
                    std::io::Error::other(e),
                )
            })
    }

    /// Starts the extra gateway on `host` again; waits until it answers.
    pub fn start_extra_gateway(&mut self, host: &str) -> Result<(), LabError> {
        let cp = self.extra_gateway(host)?;
        let bin = find_binary("ferry", "ferry-cli")?;
        let mut child = cp.spawn(&self.prefix, &bin)?;
        self.record_started(&child, "gateway-extra", &cp.host)?;
        let ready = cp.wait_ready(&self.prefix, &mut child);
        self.children.push(child);
        ready
    }

    /// [`Lab::api`] against the gateway `cp` (one of [`ControlPlane::all`]), from its host.
    pub fn api_at<T, F, Fut>(&self, cp: &ControlPlane, f: F) -> Result<T, LabError>
    where
        F: FnOnce(ferry_api::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let client = ferry_api::Client::with_token_file(cp.api, &cp.token_file)
            .map_err(|e| LabError::Ferry {
                args: "(api)".into(),
                message: e.to_string(),
            })?
            .with_tls(cp.client_tls(crate::control::Party::Operator)?);
        run_in(&self.netns(&cp.host), move || {
            ferry_api::transport::block_on(f(client))
        })?
        .map_err(|e| LabError::io("starting a runtime for the API client", e))
    }

    /// Records a process this lab started after it came up (its PID and start time, so
    /// teardown and the `kill_*` calls end that process and no other).
    fn record_started(&self, child: &Child, kind: &str, host: &str) -> Result<(), LabError> {
        let mut st = self.load_state()?;
        let pid = child.id() as i32;
        let start_time = procs::start_time(pid)
            .map_err(|e| LabError::io(format!("reading the start time of PID {pid}"), e))?;
        st.processes.push(ProcRecord {
            pid,
            start_time,
            kind: kind.to_owned(),
            host: Some(host.to_owned()),
        });
        st.save()
    }

    fn load_state(&self) -> Result<LabState, LabError> {
        state::LabState::load(&self.prefix)?.ok_or_else(|| LabError::State {
            prefix: self.prefix.clone(),
            path: state::state_file(&self.prefix),
            problem: "no state".into(),
        })
    }

    /// Sends `signal` to `host`'s agent (by PID and start time) and waits until it exited (at
    /// most 10 s; a SIGTERM still unanswered then is followed by SIGKILL). Its containers,
    /// namespaces and datapath stay as the agent leaves them.
    pub fn kill_agent(&mut self, host: &str, signal: i32) -> Result<(), LabError> {
        let runs_one = self
            .load_state()?
            .processes
            .iter()
            .any(|p| p.kind == "agent" && p.host.as_deref() == Some(host));
        let failed = |problem: String| {
            LabError::io(
                format!("stopping the agent of {host}"),
                std::io::Error::other(problem),
            )
        };
        if !runs_one {
            return Err(failed("the lab runs no agent there".into()));
        }
        self.stop_recorded("agent", Some(host), signal, Duration::from_secs(10))
            .map_err(failed)
    }

    /// `host`'s agent metrics (Prometheus text, from inside its namespace).
    pub fn agent_metrics_text(&self, host: &str) -> Result<String, LabError> {
        let out = self.exec(host, &["curl", "-sf", "http://127.0.0.1:9464/metrics"])?;
        if !out.status.success() {
            return Err(LabError::io(
                format!("reading the metrics of {host}'s agent"),
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One sample of `host`'s agent metrics: `series` is the whole name with its labels as
    /// the agent writes them (`ferry_public_failover_total{host="gw2",event="heartbeat_heard"}`).
    /// None if the agent does not answer or has no such series.
    pub fn agent_metric(&self, host: &str, series: &str) -> Option<u64> {
        self.agent_metrics_text(host).ok()?.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Waits (up to `within`) until the agents of `hosts` have heard a heartbeat from the
    /// gateway-role hosts ([`Self::agent_metric`] `heartbeat_heard` > 0): before that, a
    /// standby gives a silent host ten times as long (it may not have started yet).
    pub fn wait_public_heartbeats(&self, hosts: &[&str], within: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + within;
        for h in hosts {
            let series =
                format!("ferry_public_failover_total{{host=\"{h}\",event=\"heartbeat_heard\"}}");
            while self.agent_metric(h, &series).unwrap_or(0) == 0 {
                if Instant::now() > deadline {
                    return Err(LabError::io(
                        format!("waiting for {h} to hear the gateway-role hosts"),
                        std::io::Error::other(format!("no heartbeat heard within {within:?}")),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// `host` dies at once, as at a power cut: every process the lab runs there (its agent, a
    /// gateway daemon, an etcd member) is SIGKILLed by PID, and every interface of its
    /// namespace is set down, so nothing reaches it and nothing leaves it (its eBPF programs
    /// stay attached to interfaces that carry nothing). The namespace stays, for the teardown.
    /// Returns the kinds of process killed.
    pub fn power_off(&mut self, host: &str) -> Result<Vec<String>, LabError> {
        if self.host(host).is_none() {
            return Err(LabError::io(
                format!("powering {host} off"),
                std::io::Error::other("no such host in this lab"),
            ));
        }
        let mut kinds: Vec<String> = self
            .load_state()?
            .processes
            .iter()
            .filter(|p| p.host.as_deref() == Some(host))
            .map(|p| p.kind.clone())
            .collect();
        kinds.sort();
        kinds.dedup();
        for kind in &kinds {
            self.stop_recorded(kind, Some(host), libc::SIGKILL, Duration::from_secs(5))
                .map_err(|e| {
                    LabError::io(
                        format!("killing {kind} on {host}"),
                        std::io::Error::other(e),
                    )
                })?;
        }
        let links = self.exec(host, &["ip", "-o", "link", "show"])?;
        let text = String::from_utf8_lossy(&links.stdout);
        for name in text.lines().filter_map(|l| {
            let name = l.split(": ").nth(1)?.split('@').next()?;
            (name != "lo").then(|| name.to_owned())
        }) {
            self.exec(host, &["ip", "link", "set", &name, "down"])?;
        }
        Ok(kinds)
    }

    /// Starts `host`'s agent again (after [`Lab::kill_agent`]) with the same configuration and
    /// waits until it serves its metrics.
    pub fn start_agent(&mut self, host: &str) -> Result<(), LabError> {
        let bin = find_binary("ferry-agent", "ferry-agent")?;
        let mut child = spawn_agent(&self.prefix, host, &bin)?;
        self.record_started(&child, "agent", host)?;
        let listen: SocketAddr = DEFAULT_METRICS_LISTEN.parse().expect("valid default");
        let ns = netns_path(&netns_name(&self.prefix, host));
        let log = self.agent_log(host);
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        let ready = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Err(LabError::AgentDied {
                    host: host.to_owned(),
                    status,
                    tail: tail(&log, 40),
                    log: log.clone(),
                });
            }
            if crate::control::http_ok(&ns, listen, "/metrics", None) {
                break Ok(());
            }
            if Instant::now() >= deadline {
                break Err(LabError::AgentTimeout {
                    host: host.to_owned(),
                    listen,
                    secs: AGENT_READY_TIMEOUT.as_secs(),
                    tail: tail(&log, 40),
                    log: log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.children.push(child);
        ready
    }

    /// Restarts `host`'s agent: `signal` (SIGTERM: an upgrade; SIGKILL: a crash), then start.
    pub fn restart_agent(&mut self, host: &str, signal: i32) -> Result<(), LabError> {
        self.kill_agent(host, signal)?;
        self.start_agent(host)
    }

    /// Tears the lab down and reports every error.
    pub fn down(mut self) -> Result<(), LabError> {
        self.detached = true;
        self.teardown_now().map_err(LabError::from)
    }

    /// Leaves the lab running and returns its prefix (`ferry-lab down --lab PREFIX` removes
    /// it). A reaper, if the lab has one, still tears it down when this process exits.
    pub fn detach(mut self) -> String {
        self.detached = true;
        // Children keep running; dropping a `Child` neither kills nor waits for it.
        std::mem::take(&mut self.prefix)
    }

    fn teardown_now(&mut self) -> Result<(), TeardownError> {
        let result = teardown(&self.prefix);
        // Reap our own children (they were stopped by teardown) so no zombie lingers.
        for child in &mut self.children {
            let _ = child.try_wait();
        }
        self.children.clear();
        result
    }

    /// A handle on a lab that is already up (by its prefix), e.g. from `ferry-lab up`:
    /// dropping it leaves the lab as it is.
    pub fn attach(prefix: &str) -> Result<Self, LabError> {
        state::check_prefix(prefix)?;
        let st =
            state::LabState::load(prefix)?.ok_or_else(|| LabError::NoSuchLab(prefix.into()))?;
        Ok(Self {
            prefix: prefix.to_owned(),
            topology: st.topology,
            children: Vec::new(),
            up_duration: Duration::ZERO,
            detached: true,
        })
    }

    /// The host a container endpoint lives on now (from the gateway's registry).
    pub fn endpoint_host(&self, ip: std::net::Ipv4Addr) -> Result<String, LabError> {
        let endpoints = self
            .api(|c| async move { c.endpoints().await })?
            .map_err(|e| LabError::Ferry {
                args: "(api) GET /v1/endpoints".into(),
                message: e.to_string(),
            })?;
        endpoints
            .into_iter()
            .find(|e| e.ip == ip)
            .map(|e| e.host)
            .ok_or_else(|| LabError::Ferry {
                args: "(api) GET /v1/endpoints".into(),
                message: format!("no endpoint {ip} in the registry"),
            })
    }

    /// One request to a host's agent on its peer API (`<underlay address>:7401`, the lab's
    /// token), as the operator, made from inside that host's namespace. Returns the status and
    /// the body.
    pub fn agent_request(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), LabError> {
        self.agent_request_as(crate::control::Party::Operator, host, method, path, body)
    }

    /// [`Lab::agent_request`] with the TLS identity of `party` (the gateway's, to reach the
    /// routes only the gateway may call).
    pub fn agent_request_as(
        &self,
        party: crate::control::Party<'_>,
        host: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), LabError> {
        let h = self.host(host).ok_or_else(|| LabError::UnknownNode {
            prefix: self.prefix.clone(),
            name: host.to_owned(),
            known: self.nodes().join(", "),
        })?;
        let addr = SocketAddr::new(h.address.into(), AGENT_API_PORT);
        let cp = self.control_or_err()?;
        let token =
            ferry_api::client::read_token_file(&cp.token_file).map_err(|e| LabError::Ferry {
                args: format!("(agent {host}) {method} {path}"),
                message: e.to_string(),
            })?;
        let mut request = ferry_api::transport::Request::new(method, path)
            .token(token)
            .tls(cp.client_tls(party)?)
            .timeout(Duration::from_secs(30));
        if let Some(b) = body {
            // Any body goes as JSON (the agents' JSON routes need the type).
            request = request.json(b.to_vec());
        }
        let what = format!("agent {host} ({addr}): {method} {path}");
        let r = run_in(&self.netns(host), move || request.send_blocking(addr))?
            .map_err(|e| LabError::io(what, std::io::Error::other(e)))?;
        Ok((r.status, r.body.to_vec()))
    }

    /// An agent's answer as `T`, or an error carrying the API error (`... (code, HTTP n)`).
    fn agent_json<T: serde::de::DeserializeOwned>(
        host: &str,
        what: &str,
        (status, body): (u16, Vec<u8>),
    ) -> Result<T, LabError> {
        let args = format!("(agent {host}) {what}");
        if !(200..300).contains(&status) {
            return Err(LabError::Ferry {
                args,
                message: ferry_api::client::http_error(status, &body).to_string(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| LabError::Ferry {
            args,
            message: format!(
                "unparseable answer {:?}: {e}",
                String::from_utf8_lossy(&body)
            ),
        })
    }

    /// Starts `argv` (absolute program path) as the process tree of container `ip`, through
    /// the agent of the host the container lives on.
    pub fn start_process(
        &self,
        ip: std::net::Ipv4Addr,
        argv: &[&str],
    ) -> Result<ferry_api::run::ContainerProcess, LabError> {
        let host = self.endpoint_host(ip)?;
        self.start_process_on(&host, ip, argv)
    }

    /// Starts `argv` in container `ip` through the agent of `host` (whether or not the
    /// container lives there).
    pub fn start_process_on(
        &self,
        host: &str,
        ip: std::net::Ipv4Addr,
        argv: &[&str],
    ) -> Result<ferry_api::run::ContainerProcess, LabError> {
        self.start_process_with_env(host, ip, argv, &[])
    }

    /// [`Lab::start_process_on`] with extra environment variables for the tree (they survive
    /// a CRIU migration, being in the processes' memory: a way to find the tree's copies).
    pub fn start_process_with_env(
        &self,
        host: &str,
        ip: std::net::Ipv4Addr,
        argv: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ferry_api::run::ContainerProcess, LabError> {
        let req = ferry_api::run::StartRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            runtime: ferry_api::run::RuntimeKind::Agent,
            image: None,
        };
        self.start_request(host, ip, &req)
    }

    /// Starts `argv` in container `ip` as an OCI container under runc, on the root file
    /// system `image` (a name in the agents' images directory, as [`crate::image::build`]
    /// returns it), through the agent of the host the container lives on.
    pub fn start_runc(
        &self,
        ip: std::net::Ipv4Addr,
        image: &str,
        argv: &[&str],
    ) -> Result<ferry_api::run::ContainerProcess, LabError> {
        let host = self.endpoint_host(ip)?;
        let req = ferry_api::run::StartRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            runtime: ferry_api::run::RuntimeKind::Runc,
            image: Some(image.to_owned()),
        };
        self.start_request(&host, ip, &req)
    }

    /// `POST /v1/containers/{ip}/start` with `req` on the agent of `host`.
    pub fn start_request(
        &self,
        host: &str,
        ip: std::net::Ipv4Addr,
        req: &ferry_api::run::StartRequest,
    ) -> Result<ferry_api::run::ContainerProcess, LabError> {
        let body = serde_json::to_vec(req).expect("a start request serializes");
        let path = format!("/v1/containers/{ip}/start");
        let answer = self.agent_request(host, "POST", &path, Some(&body))?;
        Self::agent_json(host, &format!("POST {path}"), answer)
    }

    /// Container `ip`'s process as the agent of its current host knows it (`None`: no
    /// process there).
    pub fn process(
        &self,
        ip: std::net::Ipv4Addr,
    ) -> Result<Option<ferry_api::run::ContainerProcess>, LabError> {
        let host = self.endpoint_host(ip)?;
        let path = format!("/v1/containers/{ip}");
        let answer = self.agent_request(&host, "GET", &path, None)?;
        if answer.0 == 404
            && ferry_api::client::http_error(answer.0, &answer.1).code() == Some("no_process")
        {
            return Ok(None);
        }
        Self::agent_json(&host, &format!("GET {path}"), answer).map(Some)
    }

    /// Stops container `ip`'s process (SIGTERM, SIGKILL after 2 s) through the agent of its
    /// current host; returns it as it ended.
    pub fn stop_process(
        &self,
        ip: std::net::Ipv4Addr,
    ) -> Result<ferry_api::run::ContainerProcess, LabError> {
        let host = self.endpoint_host(ip)?;
        let path = format!("/v1/containers/{ip}/process");
        let answer = self.agent_request(&host, "DELETE", &path, None)?;
        Self::agent_json(&host, &format!("DELETE {path}"), answer)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(e) = self.teardown_now() {
            tracing::error!(error = %e, "lab teardown on drop");
            eprintln!("ferry-lab: {e}");
        }
    }
}

/// Creates `/run/ferry-lab/<prefix>/` for a fresh prefix no other lab uses.
fn create_state_dir() -> Result<String, LabError> {
    let root = Path::new(state::STATE_ROOT);
    std::fs::create_dir_all(root)
        .map_err(|e| LabError::io(format!("creating {}", root.display()), e))?;
    for _ in 0..16 {
        let prefix = state::random_prefix()?;
        let taken = std::fs::read_dir(ferry_overlay::netns::NETNS_RUN_DIR)
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            })
            .unwrap_or(false);
        if taken {
            continue;
        }
        // Root only: the lab's token, keys, state and the agents' and gateway's files.
        match std::fs::DirBuilder::new()
            .mode(ferry_api::private::DIR_MODE)
            .create(state::state_dir(&prefix))
        {
            Ok(()) => return Ok(prefix),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(LabError::io(
                    format!("creating {}", state::state_dir(&prefix).display()),
                    e,
                ));
            }
        }
    }
    Err(LabError::io(
        "choosing a lab prefix",
        std::io::Error::other("16 random prefixes were all taken"),
    ))
}

struct Builder {
    state: LabState,
    children: Vec<Child>,
}

impl Builder {
    fn prefix(&self) -> &str {
        &self.state.prefix
    }

    fn ns(&self, node: &str) -> String {
        netns_name(self.prefix(), node)
    }

    fn dir(&self) -> PathBuf {
        state::state_dir(self.prefix())
    }

    fn build(
        &mut self,
        reaper: Option<&Path>,
        wan: Option<&Path>,
        agent: Option<&Path>,
        ferry: Option<&Path>,
    ) -> Result<(), LabError> {
        self.state.save()?;
        let faults = state::fault_dir(self.prefix());
        std::fs::create_dir_all(&faults)
            .map_err(|e| LabError::io(format!("creating {}", faults.display()), e))?;
        if let Some(bin) = reaper {
            self.spawn_reaper(bin)?;
        }
        self.create_namespaces()?;
        self.steer_flows()?;
        self.wire()?;
        if let Some(bin) = wan {
            self.start_wan(bin)?;
        }
        if let Some(bin) = ferry {
            self.start_etcd()?;
            self.start_gateway(bin)?;
        }
        if let Some(bin) = agent {
            self.start_agents(bin)?;
        }
        Ok(())
    }

    /// Starts the topology's etcd members (one per cloud, in its first host) and waits until
    /// each answers healthy (a leader elected).
    fn start_etcd(&mut self) -> Result<(), LabError> {
        let t = self.state.topology.clone();
        let members = crate::control::etcd_members(&t);
        if !members.is_empty() && !self.state.insecure_plaintext {
            write_etcd_tls(self.prefix(), &t)?;
        }
        for (name, _) in &members {
            let child = etcd_member_command(self.prefix(), &t, name)?
                .spawn()
                .map_err(|e| {
                    LabError::io(
                        "spawning etcd (not installed? scripts/setup.sh installs etcd-server)",
                        e,
                    )
                })?;
            tracing::info!(host = %name, pid = child.id(), "etcd member started");
            let r = self.record(&child, "etcd", Some(name));
            self.children.push(child);
            r?;
        }
        for (name, _) in &members {
            wait_etcd_member(self.prefix(), &t, name)?;
        }
        Ok(())
    }

    fn start_gateway(&mut self, bin: &Path) -> Result<(), LabError> {
        let t = self.state.topology.clone();
        let Some(cp) = ControlPlane::of(self.prefix(), &t) else {
            return Ok(());
        };
        cp.write_files(&t, self.state.insecure_plaintext)?;
        let mut child = cp.spawn(self.prefix(), bin)?;
        tracing::info!(host = %cp.host, pid = child.id(), api = %cp.api, "gateway started");
        let r = self.record(&child, "gateway", Some(&cp.host));
        let ready = r.and_then(|()| cp.wait_ready(self.prefix(), &mut child));
        self.children.push(child);
        ready?;
        for g in t.extra_gateways.clone() {
            let Some(cp) = ControlPlane::extra(self.prefix(), &t, &g) else {
                continue;
            };
            cp.write_config(&t, self.state.insecure_plaintext)?;
            let mut child = cp.spawn(self.prefix(), bin)?;
            tracing::info!(host = %cp.host, pid = child.id(), api = %cp.api, "extra gateway started");
            let r = self.record(&child, "gateway-extra", Some(&cp.host));
            let ready = r.and_then(|()| cp.wait_ready(self.prefix(), &mut child));
            self.children.push(child);
            ready?;
        }
        Ok(())
    }

    fn record(&mut self, child: &Child, kind: &str, host: Option<&str>) -> Result<(), LabError> {
        let pid = child.id() as i32;
        let start_time = procs::start_time(pid)
            .map_err(|e| LabError::io(format!("reading the start time of PID {pid}"), e))?;
        self.state.processes.push(ProcRecord {
            pid,
            start_time,
            kind: kind.to_owned(),
            host: host.map(str::to_owned),
        });
        self.state.save()
    }

    fn spawn_reaper(&mut self, bin: &Path) -> Result<(), LabError> {
        let owner = std::process::id() as i32;
        let owner_start =
            procs::start_time(owner).map_err(|e| LabError::io("reading our own start time", e))?;
        let mut cmd = Command::new(bin);
        cmd.args(["reap", "--lab", self.prefix(), "--owner"])
            .arg(owner.to_string())
            .arg("--owner-start")
            .arg(owner_start.to_string())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        detach_session(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| LabError::io(format!("spawning the reaper {}", bin.display()), e))?;
        tracing::debug!(pid = child.id(), "reaper started");
        let r = self.record(&child, "reaper", None);
        self.children.push(child);
        r
    }

    fn create_namespaces(&mut self) -> Result<(), LabError> {
        let names: Vec<String> = nodes(&self.state.topology)
            .iter()
            .map(|n| self.ns(n))
            .collect();
        // Recorded first: a crash half-way still leaves them listed for teardown.
        self.state.namespaces = names.clone();
        self.state.save()?;
        let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
        self.run_batch(None, "netns", &batch)
    }

    /// Every device created in the lab's namespaces from now on (the lab's veths, and the
    /// containers' veths the agents create in the hosts' namespaces) steers each flow to one
    /// CPU (RPS over all online CPUs: `net.core.rps_default_mask`, per namespace), as a NIC's
    /// RSS does. Without it a veth queues a packet on the backlog of whichever CPU sent it,
    /// and on a busy 2-core machine one backlog can wait milliseconds for `ksoftirqd` while
    /// the other forwards the same flow's later packets: the lab then reorders TCP segments
    /// by several milliseconds, senders retransmit spuriously and receivers count the late
    /// originals as PAWS discards (`TcpExtPAWSEstab`) without any migration (see
    /// docs/lab.md, "Flows stay in order").
    fn steer_flows(&mut self) -> Result<(), LabError> {
        let mask = rps_mask(online_cpus());
        for node in nodes(&self.state.topology) {
            let path = netns_path(&self.ns(&node));
            let m = mask.clone();
            run_in(&path, move || {
                ferry_overlay::sys::write_sysctl("net/core/rps_default_mask", &m)
            })?
            .map_err(|e| LabError::io(format!("steering flows in {node} (RPS mask {mask})"), e))?;
        }
        Ok(())
    }

    /// Links, addresses, routes and sysctls of every node.
    fn wire(&mut self) -> Result<(), LabError> {
        let t = self.state.topology.clone();
        let p = self.prefix().to_owned();

        // The router: one bridge per cloud, one veth per host (host end created directly in
        // the host's namespace), and the gateway's public veth pair.
        let mut router = String::from("link set lo up\n");
        for c in &t.clouds {
            let br = format!("br-{}", c.name);
            router.push_str(&format!(
                "link add {br} type bridge forward_delay 0 stp_state 0\n\
                 addr add {}/{} dev {br}\n\
                 link set {br} up\n",
                c.router,
                c.subnet.prefix_len()
            ));
        }
        for h in &t.hosts {
            let v = format!("v-{}", h.name);
            router.push_str(&format!(
                "link add {v} type veth peer name {HOST_IF} netns {}\n\
                 link set {v} master br-{}\n\
                 link set {v} up\n",
                netns_name(&p, &h.name),
                h.cloud
            ));
        }
        if let Some(inet) = &t.internet {
            if inet.standby.is_empty() {
                router.push_str(&format!(
                    "link add {PUBLIC_IF} netns {} type veth peer name {HOST_IF} netns {}\n",
                    netns_name(&p, &inet.gateway),
                    netns_name(&p, INET)
                ));
            } else {
                // Several hosts facing the internet: one segment, a bridge in the client's
                // namespace (see the client's batch).
                for g in inet.facing() {
                    router.push_str(&format!(
                        "link add {PUBLIC_IF} netns {} type veth peer name p-{g} netns {}\n",
                        netns_name(&p, g),
                        netns_name(&p, INET)
                    ));
                }
            }
        }
        self.run_batch(Some(ROUTER), ROUTER, &router)?;

        // Hosts and the internet client, in parallel.
        let mut batches: Vec<(String, String)> = Vec::new();
        for h in &t.hosts {
            let mut b = format!(
                "link set lo up\n\
                 addr add {}/{} dev {HOST_IF}\n\
                 link set {HOST_IF} up\n\
                 route add default via {}\n",
                h.address, h.prefix_len, h.router
            );
            if let (Some(public), Some(inet)) = (h.public_address, &t.internet) {
                b.push_str(&format!(
                    "addr add {public}/{} dev {PUBLIC_IF}\nlink set {PUBLIC_IF} up\n",
                    inet.subnet.prefix_len()
                ));
                if let Some(v6) = &inet.ipv6 {
                    // One facing host: it holds the address the client routes through. With a
                    // standby, that address moves (the facing host's agent holds it:
                    // `public6_next_hop`) and each gateway-role host has one of its own.
                    let nth = match public6_next_hop(inet) {
                        None => 0,
                        Some(_) => {
                            FLOATING6_OWN
                                + inet
                                    .facing()
                                    .position(|g| g == h.name)
                                    .map_or(0, |i| i as u128)
                        }
                    };
                    b.push_str(&format!(
                        "addr add {}/{} dev {PUBLIC_IF} nodad\n",
                        std::net::Ipv6Addr::from(u128::from(v6.gateway_address) + nth),
                        v6.subnet.prefix_len()
                    ));
                }
            }
            batches.push((h.name.clone(), b));
        }
        if let Some(inet) = &t.internet {
            let mut segment = String::new();
            if !inet.standby.is_empty() {
                segment.push_str(&format!(
                    "link add {INET_BRIDGE} type bridge\n\
                     link set {INET_BRIDGE} up\n\
                     link add {HOST_IF} type veth peer name p-client\n\
                     link set p-client master {INET_BRIDGE}\n\
                     link set p-client up\n"
                ));
                for g in inet.facing() {
                    segment.push_str(&format!(
                        "link set p-{g} master {INET_BRIDGE}\nlink set p-{g} up\n"
                    ));
                }
            }
            batches.push((
                INET.to_owned(),
                segment
                    + &format!(
                        "link set lo up\n\
                     addr add {}/{} dev {HOST_IF}\n\
                     link set {HOST_IF} up\n\
                     route add default via {}\n",
                        inet.client,
                        inet.subnet.prefix_len(),
                        inet.gateway_address
                    )
                    + &inet.ipv6.as_ref().map_or_else(String::new, |v6| {
                        // The client reaches the overlay's IPv6 through the gateway (routed or
                        // masqueraded: the gateway decides).
                        format!(
                            "addr add {}/{} dev {HOST_IF} nodad\n\
                         route add ::/0 via {}\n",
                            v6.client,
                            v6.subnet.prefix_len(),
                            v6.gateway_address
                        )
                    }),
            ));
        }
        let mut running = Vec::new();
        for (node, text) in &batches {
            running.push((node.clone(), self.spawn_batch(Some(node), node, text)?));
        }
        let mut first_error = None;
        for (node, (cmd, child)) in running {
            if let Err(e) = finish_batch(&node, cmd, child)
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }

        // Forwarding on the router and on gateways.
        let mut forwarders = vec![ROUTER.to_owned()];
        if let Some(inet) = &t.internet {
            forwarders.extend(inet.facing().map(str::to_owned));
        }
        for node in forwarders {
            let path = netns_path(&self.ns(&node));
            run_in(&path, || {
                ferry_overlay::sys::write_sysctl("net/ipv4/ip_forward", "1")
            })?
            .map_err(|e| LabError::io(format!("enabling ip_forward in {node}"), e))?;
        }
        Ok(())
    }

    /// Writes an `ip` batch file into the state dir (kept for debugging) and runs it, in
    /// node `ns`'s namespace (or the root one for `None`: only `netns add` lines go there).
    fn run_batch(&self, ns: Option<&str>, label: &str, text: &str) -> Result<(), LabError> {
        let (cmd, child) = self.spawn_batch(ns, label, text)?;
        finish_batch(label, cmd, child)
    }

    fn spawn_batch(
        &self,
        ns: Option<&str>,
        label: &str,
        text: &str,
    ) -> Result<(String, Child), LabError> {
        let file = self.dir().join(format!("{label}.ip"));
        std::fs::write(&file, text)
            .map_err(|e| LabError::io(format!("writing {}", file.display()), e))?;
        let mut cmd = Command::new("ip");
        if let Some(node) = ns {
            cmd.arg("-n").arg(self.ns(node));
        }
        cmd.arg("-b").arg(&file);
        let shown = format!("{cmd:?}").replace('"', "");
        tracing::debug!(command = %shown, "ip batch");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::io(format!("running {shown}"), e))?;
        Ok((shown, child))
    }

    /// The shaped links (see [`crate::wan`]): TUN devices and policy rules in the router,
    /// then the forwarder, recorded before anything waits on it; returns once it answers on
    /// its socket.
    fn start_wan(&mut self, bin: &Path) -> Result<(), LabError> {
        let plan = wan::plan(&self.state.topology);
        if plan.is_empty() {
            return Ok(());
        }
        self.run_batch(Some(ROUTER), "wan", &wan::ip_batch(&plan))?;
        // Packets written back into a TUN device come in on it with a source address that
        // routes via a bridge: reverse-path filtering must not drop them. No IPv6 on the TUN
        // devices (the lab is IPv4; the kernel's own router solicitations would only cross
        // the link as noise).
        let tuns: Vec<String> = plan.iter().map(|d| d.tun.clone()).collect();
        run_in(&netns_path(&self.ns(ROUTER)), move || {
            use ferry_overlay::sys::write_sysctl;
            write_sysctl("net/ipv4/conf/all/rp_filter", "0")?;
            for t in &tuns {
                write_sysctl(&format!("net/ipv4/conf/{t}/rp_filter"), "0")?;
                let v6 = format!("net/ipv6/conf/{t}/disable_ipv6");
                if Path::new("/proc/sys").join(&v6).exists() {
                    write_sysctl(&v6, "1")?;
                }
            }
            Ok::<(), std::io::Error>(())
        })?
        .map_err(|e| LabError::io("setting the WAN links' sysctls in the router", e))?;
        let dir = self.dir();
        let config = wan::config_path(&dir);
        let socket = wan::stats_socket(&dir);
        let cfg = wan::forwarder_config(&plan, socket.clone());
        let text = serde_json::to_string_pretty(&cfg).expect("a forwarder config serialises");
        std::fs::write(&config, text)
            .map_err(|e| LabError::io(format!("writing {}", config.display()), e))?;
        let log_path = wan::log_path(&dir);
        let log = std::fs::File::create(&log_path)
            .map_err(|e| LabError::io(format!("creating {}", log_path.display()), e))?;
        let mut cmd = Command::new(bin);
        cmd.arg("wan-forward")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        command_in(&mut cmd, &netns_path(&self.ns(ROUTER)))?;
        detach_session(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| LabError::io(format!("spawning {} wan-forward", bin.display()), e))?;
        tracing::info!(
            pid = child.id(),
            links = self.state.topology.links.len(),
            "wan forwarder started"
        );
        let recorded = self.record(&child, WAN_FORWARDER, None);
        let ready = recorded.and_then(|()| {
            let deadline = Instant::now() + WAN_READY_TIMEOUT;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(LabError::WanForwarder {
                        problem: format!("exited ({status}) before it was ready"),
                        tail: tail(&log_path, 20),
                        log: log_path.clone(),
                    });
                }
                if wan::query_stats(&socket).is_ok() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(LabError::WanForwarder {
                        problem: format!(
                            "did not answer on {} within {} s",
                            socket.display(),
                            WAN_READY_TIMEOUT.as_secs()
                        ),
                        tail: tail(&log_path, 20),
                        log: log_path.clone(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        self.children.push(child);
        ready
    }

    fn start_agents(&mut self, bin: &Path) -> Result<(), LabError> {
        let t = self.state.topology.clone();
        let listen: SocketAddr = DEFAULT_METRICS_LISTEN.parse().expect("valid default");
        let control = ControlPlane::of(self.prefix(), &t);
        for h in &t.hosts {
            let gateway_role = h.role == Role::Gateway && h.public_address.is_some();
            let dir = self.dir().join(&h.name);
            ferry_api::private::create_dir(&dir)
                .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
            let cfg = AgentConfig {
                host: h.name.clone(),
                vtep: h.address,
                overlay_ip: h.overlay_ip,
                overlay_cidr: t.overlay_cidr,
                overlay6_cidr: t.overlay6_cidr,
                public6: gateway_role && t.internet.as_ref().is_some_and(|i| i.public6),
                public6_next_hop: t
                    .internet
                    .as_ref()
                    .filter(|_| gateway_role)
                    .and_then(public6_next_hop),
                direct_routing: t.direct_routing,
                vni: t.vni,
                vxlan_port: t.vxlan_port,
                vxlan_device: DEFAULT_VXLAN_DEVICE.to_owned(),
                metrics_listen: listen,
                bpffs_dir: Some(Path::new(BPFFS_ROOT).join(netns_name(self.prefix(), &h.name))),
                peers: t
                    .hosts
                    .iter()
                    .filter(|o| o.name != h.name)
                    .map(|o| Peer {
                        name: o.name.clone(),
                        vtep: o.address,
                        overlay_ip: o.overlay_ip,
                    })
                    .collect(),
                role: if gateway_role {
                    HostRole::Gateway
                } else {
                    HostRole::Host
                },
                container_netns_prefix: container_netns_prefix(self.prefix(), &h.name),
                public_interface: gateway_role.then(|| PUBLIC_IF.to_owned()),
                masquerade: true,
                gateway: control
                    .as_ref()
                    .and_then(|_| ControlPlane::agent_link(self.prefix(), &t, &h.name)),
                tls: control
                    .as_ref()
                    .and_then(|cp| cp.tls_files(crate::control::Party::Host(&h.name))),
                insecure_plaintext: control.as_ref().is_some_and(|cp| !cp.is_tls()),
                hold_device: ferry_config::DEFAULT_HOLD_DEVICE.to_owned(),
                hold: self.state.hold_limits,
                announce: ferry_announce::Schedule::default(),
                announce_relay: t.announce_relay.then(|| HOST_IF.to_owned()),
                handoff_socket: handoff_socket(self.prefix(), &h.name),
                api_listen: SocketAddr::new(h.address.into(), AGENT_API_PORT),
                handoff_max_bytes: ferry_config::DEFAULT_HANDOFF_MAX_BYTES,
                criu: ferry_config::CriuConfig {
                    // Images in RAM, one directory per host: no directory is shared
                    // between the hosts (see `state::SHM_ROOT`).
                    work_dir: state::criu_work_dir(self.prefix(), &h.name),
                    action_script: crate::bins::find_binary("ferry", "ferry-cli")?,
                    ..Default::default()
                },
                // What a restarted agent adopts, per host, in the lab's state directory.
                state_dir: agent_state_dir(self.prefix(), &h.name),
                // The default hides /run/ferry-lab (every lab's token, keys and state) and
                // the agent's own directories from the containers. Podman: the host's own
                // (`crate::podman`).
                runtime: ferry_config::RuntimeConfig {
                    podman: crate::podman::agent_config(self.prefix(), &h.name),
                    ..Default::default()
                },
                // ferry-cni's way to this host's agent (a lab with a gateway has IPAM).
                cni_socket: control.as_ref().map(|_| cni_socket(self.prefix(), &h.name)),
                cni_network: ferry_config::DEFAULT_CNI_NETWORK.to_owned(),
                public_failover: ferry_config::PublicFailover::default(),
            };
            let config = dir.join("agent.toml");
            std::fs::write(&config, cfg.to_toml())
                .map_err(|e| LabError::io(format!("writing {}", config.display()), e))?;
            let child = spawn_agent(self.prefix(), &h.name, bin)?;
            let r = self.record(&child, "agent", Some(&h.name));
            self.children.push(child);
            r?;
        }
        self.wait_agents(listen)
    }

    /// Waits until every agent answers `GET /metrics` inside its namespace.
    fn wait_agents(&mut self, listen: SocketAddr) -> Result<(), LabError> {
        let t0 = Instant::now();
        let deadline = t0 + AGENT_READY_TIMEOUT;
        let agents: Vec<(usize, String)> = self
            .state
            .processes
            .iter()
            .filter(|p| p.kind == "agent")
            .filter_map(|p| {
                let host = p.host.clone()?;
                let idx = self.children.iter().position(|c| c.id() as i32 == p.pid)?;
                Some((idx, host))
            })
            .collect();
        let mut pending = agents;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (idx, host) in pending {
                let log = self.dir().join(&host).join("agent.log");
                if let Ok(Some(status)) = self.children[idx].try_wait() {
                    return Err(LabError::AgentDied {
                        host,
                        status,
                        tail: tail(&log, 40),
                        log,
                    });
                }
                let ns = netns_path(&self.ns(&host));
                if crate::control::http_ok(&ns, listen, "/metrics", None) {
                    tracing::debug!(%host, elapsed_ms = t0.elapsed().as_millis() as u64, "agent ready");
                } else if Instant::now() >= deadline {
                    return Err(LabError::AgentTimeout {
                        host,
                        listen,
                        secs: AGENT_READY_TIMEOUT.as_secs(),
                        tail: tail(&log, 40),
                        log,
                    });
                } else {
                    still.push((idx, host));
                }
            }
            pending = still;
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        tracing::info!(
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "all agents serve metrics"
        );
        Ok(())
    }
}

/// Starts `host`'s agent with the configuration the lab wrote for it (`<state>/<host>/agent.toml`),
/// inside the host's namespace, its output appended to `agent.log`.
fn spawn_agent(prefix: &str, host: &str, bin: &Path) -> Result<Child, LabError> {
    let dir = state::state_dir(prefix).join(host);
    let config = dir.join("agent.toml");
    let log_path = dir.join("agent.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| LabError::io(format!("opening {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| LabError::io("duplicating the log fd", e))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env(ferry_api::faultpoint::ENV, state::fault_dir(prefix))
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    command_in(&mut cmd, &netns_path(&netns_name(prefix, host)))?;
    detach_session(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(|e| LabError::io(format!("spawning {} for host {host}", bin.display()), e))?;
    tracing::info!(%host, pid = child.id(), "agent started");
    Ok(child)
}

fn finish_batch(label: &str, shown: String, child: Child) -> Result<(), LabError> {
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::io(format!("waiting for {shown} ({label})"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The state directory of a lab host's agent (`state_dir` in its configuration).
pub fn agent_state_dir(prefix: &str, host: &str) -> PathBuf {
    state::state_dir(prefix).join(host).join("agent-state")
}

/// The hand-off socket of a lab host's agent, in the host's state directory.
pub fn handoff_socket(prefix: &str, host: &str) -> PathBuf {
    state::state_dir(prefix).join(host).join("handoff.sock")
}

/// The CNI socket of a lab host's agent, in the host's state directory (what a network
/// configuration's `"agent"` names for that host).
pub fn cni_socket(prefix: &str, host: &str) -> PathBuf {
    state::state_dir(prefix).join(host).join("cni.sock")
}

/// Prefix of the container namespaces a lab host's agent creates: `<prefix>-<host>-c-`, so
/// they belong to the lab (teardown removes every `<prefix>-*` namespace).
pub fn container_netns_prefix(prefix: &str, host: &str) -> String {
    format!("{}-c-", netns_name(prefix, host))
}

/// Puts the child in a session of its own: terminal signals (Ctrl-C) to the owner's process
/// group do not reach it, and it survives the owner.
pub(crate) fn detach_session(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2), which
    // is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
}

/// The last `lines` lines of a file (or why it could not be read).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            if all.is_empty() {
                "(empty)".to_owned()
            } else {
                all[from..].join("\n")
            }
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

/// The number of online CPUs (at least 1).
fn online_cpus() -> usize {
    // SAFETY: sysconf reads a system value and has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// A CPU mask of CPUs `0..n` as the kernel's bitmap files take it: hex, in 32-bit groups
/// separated by commas, most significant first (`3`, `ffffffff,ffffffff,f`).
fn rps_mask(n: usize) -> String {
    let n = n.max(1);
    let mut groups = Vec::new();
    let mut left = n;
    while left > 0 {
        let bits = left.min(32);
        let g: u64 = (1u64 << bits) - 1;
        groups.push(g);
        left -= bits;
    }
    groups
        .iter()
        .rev()
        .enumerate()
        .map(|(i, g)| {
            if i == 0 {
                format!("{g:x}")
            } else {
                format!("{g:08x}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// etcd's TLS material in lab `prefix`: a CA of etcd's own (`ca/`), each member's identity
/// (`member-<host>/`) and the gateways' client identity (`gateway/`).
pub(crate) fn etcd_tls_dir(prefix: &str) -> PathBuf {
    state::state_dir(prefix).join("etcd-tls")
}

/// Whether lab `prefix` speaks TLS to etcd.
pub(crate) fn etcd_tls_on(prefix: &str) -> bool {
    etcd_tls_dir(prefix).join("ca").join("ca.pem").exists()
}

/// The gateways' client configuration towards etcd (`None`: plain HTTP).
pub(crate) fn etcd_client_tls(
    prefix: &str,
) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, LabError> {
    if !etcd_tls_on(prefix) {
        return Ok(None);
    }
    let files = ferry_tls::TlsFiles::in_dir(&etcd_tls_dir(prefix).join("gateway"));
    ferry_tls::Tls::load(&files)
        .map(|t| Some(t.client_config()))
        .map_err(|e| LabError::io("loading etcd's TLS material", std::io::Error::other(e)))
}

/// Makes etcd's CA, each member's certificate (its underlay address) and the gateways'
/// client certificate (the gateway's identity). A CA of etcd's own: the agents' certificates
/// (the lab's CA) cannot reach the registry's store.
fn write_etcd_tls(prefix: &str, t: &LabTopology) -> Result<(), LabError> {
    use ferry_tls::{Ca, Identity, Validity};
    if etcd_tls_on(prefix) {
        return Ok(());
    }
    let err = |e: ferry_tls::TlsError| {
        LabError::io("making etcd's TLS material", std::io::Error::other(e))
    };
    let dir = etcd_tls_dir(prefix);
    ferry_api::private::create_dir(&dir)
        .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
    let ca = Ca::generate("ferry lab etcd CA", Validity::days(30)).map_err(err)?;
    let mut parties = vec![("gateway".to_owned(), Identity::Gateway, vec![])];
    for (name, addr) in crate::control::etcd_members(t) {
        parties.push((
            format!("member-{name}"),
            Identity::host(&format!("etcd-{name}")).map_err(err)?,
            vec![addr.ip(), std::net::IpAddr::from([127, 0, 0, 1])],
        ));
    }
    for (sub, id, ips) in parties {
        let issued = ca.issue(&id, &ips, Validity::days(30)).map_err(err)?;
        ferry_tls::write_party(&dir.join(sub), &ca, &issued).map_err(err)?;
    }
    // Last: its presence says the material is whole.
    ca.save(&dir.join("ca")).map_err(err)
}

fn etcd_dir(prefix: &str) -> PathBuf {
    state::state_dir(prefix).join("etcd")
}

/// The command that runs etcd member `name` (a host of topology `etcd`) in its namespace,
/// from its data if it has some (log appended under the lab's state).
fn etcd_member_command(prefix: &str, t: &LabTopology, name: &str) -> Result<Command, LabError> {
    let members = crate::control::etcd_members(t);
    let Some((_, client)) = members.iter().find(|(n, _)| n == name) else {
        return Err(LabError::io(
            format!("starting etcd on {name}"),
            std::io::Error::other("not an etcd member of this lab"),
        ));
    };
    let tls = etcd_tls_dir(prefix);
    let secure = etcd_tls_on(prefix);
    let scheme = if secure { "https" } else { "http" };
    let peer = |name: &str| {
        let h = t.host(name).expect("members are hosts");
        format!(
            "{scheme}://{}:{}",
            h.address,
            crate::control::ETCD_PEER_PORT
        )
    };
    let initial = members
        .iter()
        .map(|(n, _)| format!("{n}={}", peer(n)))
        .collect::<Vec<_>>()
        .join(",");
    let dir = etcd_dir(prefix);
    ferry_api::private::create_dir(&dir)
        .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| LabError::io(format!("opening {}", log_path.display()), e))?;
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", name, "--data-dir"])
        .arg(dir.join(name))
        .args([
            "--listen-client-urls",
            &format!("{scheme}://{client}"),
            "--advertise-client-urls",
            &format!("{scheme}://{client}"),
            "--listen-peer-urls",
            &peer(name),
            "--initial-advertise-peer-urls",
            &peer(name),
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            &format!("ferry-lab-{prefix}"),
            "--initial-cluster-state",
            "new",
            // Elect within a second of losing a leader (links between the lab's clouds are
            // fast unless shaped).
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "1000",
            // A member that was cut off and comes back does not depose the leader (its term
            // grew while it campaigned alone): without pre-vote its return would cost every
            // gateway an election, and their leases' renewals with it.
            "--pre-vote=true",
            // Old revisions go after 5 minutes (the gateways' log is compacted by
            // checkpoints; this bounds etcd's own history).
            "--auto-compaction-retention",
            "5m",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if secure {
        // Clients and peers both present a certificate of etcd's own CA (the gateways' etcd
        // identity, the members'): nothing else on the underlay reads or writes the registry.
        let member = ferry_tls::TlsFiles::in_dir(&tls.join(format!("member-{name}")));
        let (ca, cert, key) = (
            member.ca.display().to_string(),
            member.cert.display().to_string(),
            member.key.display().to_string(),
        );
        cmd.args([
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--trusted-ca-file",
            &ca,
            "--client-cert-auth",
            "--peer-cert-file",
            &cert,
            "--peer-key-file",
            &key,
            "--peer-trusted-ca-file",
            &ca,
            "--peer-client-cert-auth",
        ]);
    }
    command_in(&mut cmd, &netns_path(&netns_name(prefix, name)))?;
    detach_session(&mut cmd);
    Ok(cmd)
}

/// Waits until etcd member `name` answers healthy (at most [`crate::control::ETCD_READY_TIMEOUT`]).
fn wait_etcd_member(prefix: &str, t: &LabTopology, name: &str) -> Result<(), LabError> {
    let members = crate::control::etcd_members(t);
    let Some((_, client)) = members.iter().find(|(n, _)| n == name) else {
        return Ok(());
    };
    let deadline = Instant::now() + crate::control::ETCD_READY_TIMEOUT;
    let ns = netns_path(&netns_name(prefix, name));
    let tls = etcd_client_tls(prefix)?;
    while !crate::control::http_ok(&ns, *client, "/health", tls.clone()) {
        if Instant::now() >= deadline {
            return Err(LabError::io(
                format!(
                    "etcd member {name} not healthy within {} s: {}",
                    crate::control::ETCD_READY_TIMEOUT.as_secs(),
                    tail(&etcd_dir(prefix).join(format!("{name}.log")), 20)
                ),
                std::io::Error::other("etcd not ready"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::rps_mask;

    #[test]
    fn the_mask_covers_every_cpu_in_32_bit_groups() {
        assert_eq!(rps_mask(0), "1");
        assert_eq!(rps_mask(1), "1");
        assert_eq!(rps_mask(2), "3");
        assert_eq!(rps_mask(12), "fff");
        assert_eq!(rps_mask(32), "ffffffff");
        assert_eq!(rps_mask(33), "1,ffffffff");
        assert_eq!(rps_mask(68), "f,ffffffff,ffffffff");
    }
}
