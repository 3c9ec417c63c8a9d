//! One invocation of the plugin: environment + stdin in, stdout + exit status out. The agent
//! is behind the [`Agent`] trait ([`UnixAgent`] is the real one), so the whole flow is
//! unit-tested without an agent.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd as _, BorrowedFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::Duration,
};

use ferry_workload::wire::{WireError, recv_message, send_message};

use crate::{
    proto::{Op, Reply, Request},
    spec::{self, CniError, Command, ErrorCode, Version},
};

/// How long the plugin waits for the agent's answer. An `ADD` waits for the gateway and for
/// the agent's own apply (the agent gives up well before this, cleaning up).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The local agent.
pub trait Agent {
    /// Sends `req` (with the namespace's descriptor, if any) to the agent at `socket` and
    /// returns its answer.
    fn call(
        &self,
        socket: &Path,
        req: &Request,
        netns: Option<BorrowedFd<'_>>,
    ) -> Result<Reply, CniError>;
}

/// The agent on its Unix socket.
pub struct UnixAgent {
    pub timeout: Duration,
}

impl Default for UnixAgent {
    fn default() -> Self {
        Self {
            timeout: AGENT_TIMEOUT,
        }
    }
}

fn connect_error(socket: &Path, e: io::Error) -> CniError {
    let code = match e.kind() {
        io::ErrorKind::PermissionDenied => ErrorCode::Io,
        // Missing or refused: no agent serves it now (stopped, restarting, crashed).
        _ => ErrorCode::TryAgainLater,
    };
    let hint = if code == ErrorCode::Io {
        " (the socket is root's only: run the plugin as root)"
    } else {
        " (is ferry-agent running, with cni_socket set to this path?)"
    };
    CniError::new(
        code,
        format!(
            "the ferry agent does not answer on {}: {e}{hint}",
            socket.display()
        ),
    )
}

fn wire_error(socket: &Path, what: &str, e: WireError) -> CniError {
    let timed_out = matches!(&e, WireError::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
    let code = if timed_out || matches!(e, WireError::Eof { .. }) {
        // No answer in time, or the agent went away mid-request.
        ErrorCode::TryAgainLater
    } else if e.is_malformed() {
        ErrorCode::Decode
    } else {
        ErrorCode::Io
    };
    CniError::new(
        code,
        format!("{what} the ferry agent on {}: {e}", socket.display()),
    )
}

impl Agent for UnixAgent {
    fn call(
        &self,
        socket: &Path,
        req: &Request,
        netns: Option<BorrowedFd<'_>>,
    ) -> Result<Reply, CniError> {
        let s = UnixStream::connect(socket).map_err(|e| connect_error(socket, e))?;
        s.set_read_timeout(Some(self.timeout))
            .and_then(|()| s.set_write_timeout(Some(self.timeout)))
            .map_err(|e| CniError::new(ErrorCode::Io, format!("socket timeouts: {e}")))?;
        let header = serde_json::to_value(req)
            .map_err(|e| CniError::new(ErrorCode::Io, format!("encoding the request: {e}")))?;
        let fds: Vec<BorrowedFd<'_>> = netns.into_iter().collect();
        send_message(&s, &header, &fds, &[])
            .map_err(|e| wire_error(socket, "sending the request to", e))?;
        let m = recv_message(&s, 0).map_err(|e| wire_error(socket, "reading the answer of", e))?;
        serde_json::from_value(m.header).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                format!("the ferry agent's answer is not understood: {e}"),
            )
        })
    }
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    /// 0 on success; 1 with a CNI error on stdout.
    pub status: i32,
}

/// One invocation: `var` reads the environment, `stdin` is the network configuration.
pub fn run(var: &dyn Fn(&str) -> Option<String>, stdin: &[u8], agent: &dyn Agent) -> Outcome {
    let version = spec::answer_version(stdin);
    match invoke(var, stdin, agent, version) {
        Ok(out) => Outcome {
            stdout: out,
            status: 0,
        },
        Err(e) => Outcome {
            stdout: format!("{}\n", e.to_json(version.as_str())),
            status: 1,
        },
    }
}

fn invoke(
    var: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    agent: &dyn Agent,
    version: Version,
) -> Result<String, CniError> {
    let inv = spec::invocation(var)?;
    if inv.command == Command::Version {
        return Ok(format!("{}\n", spec::version_json(version)));
    }
    let conf = spec::parse_netconf(stdin)?;
    let op = match inv.command {
        Command::Add => Op::Add,
        Command::Del => Op::Del,
        Command::Check if conf.version.has_check() => Op::Check,
        Command::Check => {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "CHECK needs cniVersion 0.4.0 or newer; the configuration says {}",
                    conf.version
                ),
            ));
        }
        Command::Version => unreachable!("answered above"),
    };
    // The capabilities (and args.cni) come first; CNI_ARGS is the old way to ask.
    let ip = match (conf.ip, &inv.args.ip) {
        (Some(ip), _) => Some(ip),
        (None, Some(s)) => Some(spec::parse_requested_ip("CNI_ARGS IP", s)?),
        (None, None) => None,
    };
    let mac = match (conf.mac, &inv.args.mac) {
        (Some(m), _) => Some(m),
        (None, Some(s)) => Some(
            spec::parse_mac(s)
                .map_err(|e| CniError::new(ErrorCode::InvalidEnv, format!("CNI_ARGS MAC: {e}")))?,
        ),
        (None, None) => None,
    };
    // ADD and CHECK hand the agent the namespace itself; DEL needs none (it may be gone).
    let ns = match (op, &inv.netns) {
        (Op::Add | Op::Check, Some(path)) => Some(open_netns(path)?),
        _ => None,
    };
    let req = Request {
        op,
        cni_version: conf.version.as_str().to_owned(),
        network: conf.name.clone(),
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        netns: inv.netns.clone(),
        ip,
        ip6: conf.ip6,
        mac: mac.map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        }),
        fds: usize::from(ns.is_some()),
    };
    let id_of = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            (
                std::os::unix::fs::MetadataExt::dev(&m),
                std::os::unix::fs::MetadataExt::ino(&m),
            )
        })
    };
    let socket = conf.socket(id_of(Path::new("/proc/self/ns/net")), id_of)?;
    let reply = agent.call(socket, &req, ns.as_ref().map(|f| f.as_fd()))?;
    match (op, reply.into_result()?) {
        (Op::Add, Some(attached)) => {
            let sandbox = inv
                .netns
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            Ok(format!(
                "{}\n",
                spec::result_json(conf.version, &attached, &sandbox)
            ))
        }
        (Op::Add, None) => Err(CniError::new(
            ErrorCode::Decode,
            "the ferry agent answered ADD without a result",
        )),
        _ => Ok(String::new()),
    }
}

fn open_netns(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        let code = if e.kind() == io::ErrorKind::NotFound {
            ErrorCode::UnknownContainer
        } else {
            ErrorCode::Io
        };
        CniError::new(
            code,
            format!(
                "opening the container's network namespace {}: {e}",
                path.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, net::Ipv4Addr};

    use serde_json::Value;

    use super::*;
    use crate::spec::Attached;

    /// Records the requests; answers with `reply` (or fails with `fail`).
    struct FakeAgent {
        seen: RefCell<Vec<(Request, bool)>>,
        reply: Result<Reply, CniError>,
    }

    impl Agent for FakeAgent {
        fn call(
            &self,
            _: &Path,
            req: &Request,
            netns: Option<BorrowedFd<'_>>,
        ) -> Result<Reply, CniError> {
            self.seen.borrow_mut().push((req.clone(), netns.is_some()));
            self.reply.clone()
        }
    }

    fn attached() -> Attached {
        Attached {
            ip6: None,
            gateway6: None,
            ip: Ipv4Addr::new(10, 244, 0, 5),
            prefix_len: 32,
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            ifname: "eth1".into(),
            mac: "02:00:00:00:00:05".into(),
            host_if: "fc0af40005".into(),
            host_mac: "0e:fe:00:00:00:01".into(),
            migration: None,
        }
    }

    fn env(cmd: &'static str) -> impl Fn(&str) -> Option<String> {
        move |k| {
            match k {
                "CNI_COMMAND" => Some(cmd),
                "CNI_CONTAINERID" => Some("c0ffee"),
                // Any namespace file will do for the plugin: it only opens it.
                "CNI_NETNS" => Some("/proc/self/ns/net"),
                "CNI_IFNAME" => Some("eth1"),
                "CNI_PATH" => Some("/opt/cni/bin"),
                "CNI_ARGS" => Some("IgnoreUnknown=1;IP=10.244.7.7"),
                _ => None,
            }
            .map(str::to_owned)
        }
    }

    const CONF: &str = r#"{"cniVersion":"0.4.0","name":"ferry","type":"ferry-cni",
        "agent":"/run/ferry/cni.sock","runtimeConfig":{"mac":"02:00:00:00:00:05"}}"#;

    #[test]
    fn add_sends_the_namespace_and_prints_the_result_in_the_configs_version() {
        let agent = FakeAgent {
            seen: RefCell::default(),
            reply: Ok(Reply::ok(Some(attached()))),
        };
        let out = run(&env("ADD"), CONF.as_bytes(), &agent);
        assert_eq!(out.status, 0, "{}", out.stdout);
        let r: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(r["cniVersion"], "0.4.0");
        assert_eq!(r["interfaces"][1]["sandbox"], "/proc/self/ns/net");
        assert_eq!(r["ips"][0]["version"], "4");
        let seen = agent.seen.borrow();
        let (req, with_fd) = &seen[0];
        assert!(with_fd);
        assert_eq!(req.fds, 1);
        assert_eq!(req.op, Op::Add);
        assert_eq!(req.ifname, "eth1");
        // CNI_ARGS' IP is used when the capabilities give none; the MAC comes from them.
        assert_eq!(req.ip, Some(Ipv4Addr::new(10, 244, 7, 7)));
        assert_eq!(req.mac.as_deref(), Some("02:00:00:00:00:05"));
    }

    #[test]
    fn del_sends_no_namespace_and_prints_nothing() {
        let agent = FakeAgent {
            seen: RefCell::default(),
            reply: Ok(Reply::ok(None)),
        };
        let out = run(&env("DEL"), CONF.as_bytes(), &agent);
        assert_eq!(
            out,
            Outcome {
                stdout: String::new(),
                status: 0
            }
        );
        let seen = agent.seen.borrow();
        assert!(!seen[0].1);
        assert_eq!(seen[0].0.fds, 0);
    }

    #[test]
    fn errors_are_printed_as_cni_errors_and_exit_non_zero() {
        let down = FakeAgent {
            seen: RefCell::default(),
            reply: Err(connect_error(
                Path::new("/run/ferry/cni.sock"),
                io::Error::from(io::ErrorKind::ConnectionRefused),
            )),
        };
        let out = run(&env("ADD"), CONF.as_bytes(), &down);
        assert_eq!(out.status, 1);
        let e: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(e["code"], 11);
        assert_eq!(e["cniVersion"], "0.4.0");
        assert!(
            e["msg"]
                .as_str()
                .unwrap()
                .contains("does not answer on /run/ferry/cni.sock")
        );

        let refused = FakeAgent {
            seen: RefCell::default(),
            reply: Ok(Reply::error(&CniError::new(
                ErrorCode::AddressInUse,
                "taken",
            ))),
        };
        let e: Value =
            serde_json::from_str(&run(&env("ADD"), CONF.as_bytes(), &refused).stdout).unwrap();
        assert_eq!(
            (e["code"].as_u64(), e["msg"].as_str()),
            (Some(100), Some("taken"))
        );

        // Checked before the agent is asked: nothing is sent.
        let none = FakeAgent {
            seen: RefCell::default(),
            reply: Ok(Reply::ok(None)),
        };
        let e: Value = serde_json::from_str(&run(&env("ADD"), b"{not json", &none).stdout).unwrap();
        assert_eq!(
            (e["code"].as_u64(), e["cniVersion"].as_str()),
            (Some(6), Some("1.0.0"))
        );
        let old = CONF.replace("0.4.0", "0.3.1");
        let e: Value =
            serde_json::from_str(&run(&env("CHECK"), old.as_bytes(), &none).stdout).unwrap();
        assert_eq!(e["code"], 1);
        assert_eq!(e["cniVersion"], "0.3.1");
        let gone = |k: &str| match k {
            "CNI_NETNS" => Some("/run/netns/ferry-test-does-not-exist".to_owned()),
            k => env("ADD")(k),
        };
        let e: Value = serde_json::from_str(&run(&gone, CONF.as_bytes(), &none).stdout).unwrap();
        assert_eq!(e["code"], 3);
        assert!(none.seen.borrow().is_empty());

        let v = run(&env("VERSION"), CONF.as_bytes(), &none);
        assert_eq!(v.status, 0);
        let v: Value = serde_json::from_str(&v.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
    }

    /// The real client against a socket that nobody serves, and against a server that
    /// answers over the framing with the descriptor received.
    #[test]
    fn the_unix_client_speaks_the_framing() {
        let dir = std::env::temp_dir().join(format!("ferry-cni-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("cni.sock");
        let req = Request {
            op: Op::Check,
            cni_version: "1.0.0".into(),
            network: "ferry".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: None,
            ip: None,
            ip6: None,
            mac: None,
            fds: 1,
        };
        let e = UnixAgent::default().call(&sock, &req, None).unwrap_err();
        assert_eq!(e.code, ErrorCode::TryAgainLater, "{e}");

        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let m = recv_message(&s, 0).unwrap();
            let got: Request = serde_json::from_value(m.header).unwrap();
            let reply = serde_json::to_value(Reply::ok(None)).unwrap();
            send_message(&s, &reply, &[], &[]).unwrap();
            (got, m.fds.len())
        });
        let ns = File::open("/proc/self/ns/net").unwrap();
        let r = UnixAgent::default()
            .call(&sock, &req, Some(ns.as_fd()))
            .unwrap();
        assert_eq!(r, Reply::ok(None));
        let (got, fds) = server.join().unwrap();
        assert_eq!((got, fds), (req, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
