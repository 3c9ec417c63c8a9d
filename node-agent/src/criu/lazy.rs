//! Post-copy memory (`--memory lazy`): CRIU's lazy pages between two agents.
//!
//! The source runs `criu dump --lazy-pages --address VTEP --port P`: CRIU dumps everything but
//! the memory's content, writes `\0` on its `--status-fd` and then serves the pages from its
//! page pipes (its page server) until the destination has pulled every one; the tasks stay
//! seized by it meanwhile. The destination starts `criu lazy-pages --page-server` (connected to
//! the source's page server) before `criu restore --lazy-pages`: the restored tasks fault the
//! missing pages in through userfaultfd, and the lazy-pages daemon pushes the rest in the
//! background. Both CRIUs exit once the last page arrived.
//!
//! The page connection is TLS when the hosts have certificates (CRIU's `--tls`, with the
//! host's own ferry certificate, key and CA). CRIU checks the peer's certificate name against
//! the address it was given, which on the page server's side is its *own* address, so the name
//! check is off (`--tls-no-cn-verify`): the peer must hold a certificate of this cluster's CA
//! (a ferry host), and the page server takes one connection only, then exits.
//!
//! CRIU's page server `tee`s page pipes into pipes of up to 4 MiB; without CAP_SYS_RESOURCE a
//! pipe cannot grow past `fs.pipe-max-size` (1 MiB by default) and the dump fails with
//! `page-pipe: tee: 65536: Operation not permitted`. The source raises that host-wide limit to
//! [`PIPE_MAX_SIZE`] when it is lower (logged; docs/migration.md says so).

use std::{
    ffi::OsString,
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
    process::Stdio,
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use super::cmd;

/// The descriptor CRIU is told to signal readiness on (`--status-fd`).
pub const STATUS_FD: i32 = 3;
/// The pipe size CRIU's page server needs (its largest page pipe).
pub const PIPE_MAX_SIZE: u64 = 4 << 20;
const PIPE_MAX_SIZE_FILE: &str = "/proc/sys/fs/pipe-max-size";

/// The page size CRIU's page counts are in (x86-64, the only architecture ferry builds for).
pub const PAGE_SIZE: u64 = 4096;

/// The pages a lazy dump left for its page server to serve: the sum of CRIU's
/// `Pagemap generated: N pages (M lazy) K holes` lines (one per memory area).
pub fn lazy_pages_in_log(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split_once("Pagemap generated: ")?.1.split_once(" lazy)"))
        .filter_map(|(head, _)| head.rsplit_once('(')?.1.trim().parse::<u64>().ok())
        .sum()
}

/// Where the destination's `criu lazy-pages` pulls the pages from (the image stream's header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LazySource {
    /// The source's page server: its registered vtep, a port it picked.
    pub page_server: SocketAddr,
}

/// CRIU's TLS options for the page connection, from this host's ferry certificate (none when
/// the agents speak plain HTTP).
pub fn tls_args(tls: Option<&ferry_tls::TlsFiles>) -> Vec<OsString> {
    let Some(t) = tls else {
        return Vec::new();
    };
    vec![
        "--tls".into(),
        "--tls-no-cn-verify".into(),
        "--tls-cacert".into(),
        t.ca.clone().into(),
        "--tls-cert".into(),
        t.cert.clone().into(),
        "--tls-key".into(),
        t.key.clone().into(),
    ]
}

/// The source's extra `criu dump` options.
pub fn dump_args(page_server: SocketAddr, tls: Option<&ferry_tls::TlsFiles>) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--lazy-pages".into(),
        "--address".into(),
        page_server.ip().to_string().into(),
        "--port".into(),
        page_server.port().to_string().into(),
        "--status-fd".into(),
        STATUS_FD.to_string().into(),
    ];
    a.extend(tls_args(tls));
    a
}

/// The destination's `criu lazy-pages` command line.
pub fn lazy_pages_args(
    dir: &Path,
    page_server: SocketAddr,
    tls: Option<&ferry_tls::TlsFiles>,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "lazy-pages".into(),
        "--page-server".into(),
        "--address".into(),
        page_server.ip().to_string().into(),
        "--port".into(),
        page_server.port().to_string().into(),
        "--images-dir".into(),
        dir.into(),
        "--log-file".into(),
        "lazy-pages.log".into(),
        "-v4".into(),
        "--status-fd".into(),
        STATUS_FD.to_string().into(),
    ];
    a.extend(tls_args(tls));
    a
}

/// Raises `fs.pipe-max-size` to [`PIPE_MAX_SIZE`] if it is lower. Returns the value it had
/// when it changed it. Host-wide: a pipe of any process may then grow that large.
pub fn ensure_pipe_max_size() -> io::Result<Option<u64>> {
    let now: u64 = std::fs::read_to_string(PIPE_MAX_SIZE_FILE)?
        .trim()
        .parse()
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{PIPE_MAX_SIZE_FILE}: {e}"),
            )
        })?;
    if now >= PIPE_MAX_SIZE {
        return Ok(None);
    }
    std::fs::write(PIPE_MAX_SIZE_FILE, PIPE_MAX_SIZE.to_string())?;
    Ok(Some(now))
}

/// A free TCP port on `ip` for the page server (the kernel's pick; CRIU binds it a moment
/// later, and a clash makes the dump fail before anything is frozen for good).
pub fn pick_port(ip: Ipv4Addr) -> io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// A CRIU process that said it is ready (`--status-fd`) and goes on: the source's page
/// server, or the destination's lazy-pages daemon.
#[derive(Debug)]
pub struct Serving {
    child: tokio::process::Child,
    pub started: Instant,
    /// From the start to readiness.
    pub ready_ms: f64,
}

/// How a [`Serving`] CRIU ended.
#[derive(Debug)]
pub struct Ended {
    pub ok: bool,
    pub status: String,
    pub stdout: String,
    /// From readiness to the exit.
    pub after_ready_ms: f64,
}

impl Serving {
    /// Waits for the exit (the last page sent, or a failure).
    pub async fn finish(self) -> io::Result<Ended> {
        let Serving {
            child,
            started,
            ready_ms,
        } = self;
        let out = child.wait_with_output().await?;
        Ok(Ended {
            ok: out.status.success(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            after_ready_ms: started.elapsed().as_secs_f64() * 1e3 - ready_ms,
        })
    }

    /// Kills it (SIGKILL) and reaps it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Starts `binary args` with a pipe on [`STATUS_FD`] and waits until it writes its readiness
/// byte. `Ok(Err(outcome))`: it exited first (failed; the outcome says how).
pub async fn spawn_ready(
    binary: &Path,
    args: &[OsString],
    env: &[(String, String)],
    log: &Path,
) -> io::Result<Result<Serving, cmd::Outcome>> {
    let (reader, writer) = std::io::pipe()?;
    let writer: OwnedFd = writer.into();
    let raw = writer.as_raw_fd();
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if raw == STATUS_FD {
                let flags = libc::fcntl(raw, libc::F_GETFD);
                if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, STATUS_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t = Instant::now();
    let child = cmd.spawn()?;
    // Only the child holds the write end now: EOF means it exited (or closed it unready).
    drop(writer);
    let mut status = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into())?;
    let mut byte = [0u8; 1];
    let ready = matches!(status.read(&mut byte).await, Ok(1));
    let ready_ms = t.elapsed().as_secs_f64() * 1e3;
    if ready {
        return Ok(Ok(Serving {
            child,
            started: t,
            ready_ms,
        }));
    }
    let out = child.wait_with_output().await?;
    let ok = out.status.success();
    let mut errors = cmd::log_errors(&std::fs::read_to_string(log).unwrap_or_default(), 4);
    if errors.is_empty() {
        errors = String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(3)
            .map(str::to_owned)
            .collect();
        errors.reverse();
    }
    if ok {
        errors.push("it exited without saying it was ready".into());
    }
    Ok(Err(cmd::Outcome {
        ok: false,
        status: out.status.to_string(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        ms: t.elapsed().as_secs_f64() * 1e3,
        errors,
    }))
}

/// Stops every task of the tree rooted at `init` (SIGSTOP, pending while CRIU still traces
/// them): when the page server is killed its tracees are detached and stay stopped, as
/// `--leave-stopped` would have left them, instead of running on.
pub fn stop_tree(init: i32) -> io::Result<usize> {
    let pids = super::resume::tree(init)?;
    for &p in &pids {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(p, libc::SIGSTOP) };
    }
    Ok(pids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: Vec<OsString>) -> String {
        a.into_iter()
            .map(|s| s.into_string().expect("utf-8"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_dump_serves_pages_on_the_given_address_with_tls_when_the_host_has_it() {
        let ps: SocketAddr = "198.18.1.10:40123".parse().unwrap();
        assert_eq!(
            strings(dump_args(ps, None)),
            "--lazy-pages --address 198.18.1.10 --port 40123 --status-fd 3"
        );
        let tls = ferry_tls::TlsFiles::in_dir(Path::new("/etc/ferry/tls/a1"));
        let a = strings(dump_args(ps, Some(&tls)));
        assert!(
            a.ends_with(
                "--tls --tls-no-cn-verify --tls-cacert /etc/ferry/tls/a1/ca.pem \
                 --tls-cert /etc/ferry/tls/a1/cert.pem --tls-key /etc/ferry/tls/a1/key.pem"
            ),
            "{a}"
        );
    }

    #[test]
    fn the_destination_pulls_from_the_source_page_server() {
        let ps: SocketAddr = "198.18.1.10:40123".parse().unwrap();
        let a = strings(lazy_pages_args(Path::new("/run/x"), ps, None));
        assert_eq!(
            a,
            "lazy-pages --page-server --address 198.18.1.10 --port 40123 --images-dir /run/x \
             --log-file lazy-pages.log -v4 --status-fd 3"
        );
    }

    #[test]
    fn lazy_pages_are_counted_from_the_dump_log() {
        let log = "(00.1) Pagemap generated: 0 pages (0 lazy) 0 holes\n\
                   (00.2) Pagemap generated: 65536 pages (65530 lazy) 0 holes\n\
                   (00.3) page-xfer: buf 400/1\n\
                   (00.4) Pagemap generated: 3 pages (2 lazy) 1 holes\n\
                   (00.5) Pagemap generated: garbage (x lazy) 0 holes\n";
        assert_eq!(lazy_pages_in_log(log), 65532);
        assert_eq!(lazy_pages_in_log(""), 0);
    }

    #[test]
    fn the_header_field_round_trips_and_refuses_unknown_fields() {
        let l = LazySource {
            page_server: "198.18.1.10:40123".parse().unwrap(),
        };
        let j = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<LazySource>(&j).unwrap(), l);
        assert!(
            serde_json::from_str::<LazySource>(r#"{"page_server":"1.2.3.4:5","x":1}"#).is_err()
        );
    }

    #[tokio::test]
    async fn readiness_is_the_status_byte_and_an_early_exit_is_a_failure() {
        let sh = Path::new("/bin/sh");
        let log = Path::new("/nonexistent/log");
        // Says ready, then goes on until told to end.
        let args: Vec<OsString> = vec!["-c".into(), "printf '\\0' >&3; exec 3>&-; read x".into()];
        let s = spawn_ready(sh, &args, &[], log)
            .await
            .unwrap()
            .expect("ready");
        s.kill().await;
        // Exits without a word.
        let args: Vec<OsString> = vec!["-c".into(), "echo no >&2; exit 3".into()];
        let o = spawn_ready(sh, &args, &[], log)
            .await
            .unwrap()
            .expect_err("not ready");
        assert!(!o.ok);
        assert_eq!(o.errors, vec!["no".to_string()]);
        // Ready, then finishes on its own.
        let args: Vec<OsString> = vec!["-c".into(), "printf '\\0' >&3; echo done".into()];
        let s = spawn_ready(sh, &args, &[], log)
            .await
            .unwrap()
            .expect("ready");
        let e = s.finish().await.unwrap();
        assert!(e.ok, "{e:?}");
        assert_eq!(e.stdout, "done\n");
    }
}
