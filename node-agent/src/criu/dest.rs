//! The destination side: `POST /v1/images/{migration}` (from the source agent). The image
//! stream is written to disk as it arrives; then `criu restore` brings the tree back inside
//! the network namespace `prepare` built (handed to CRIU as an inherited descriptor), the
//! runtime adopts it, and the agent asks the gateway to release (hold mode) or to switch the
//! endpoint here (criu-lock mode: freeze + release, the network moves only after the restore).

use std::{net::Ipv4Addr, os::fd::OwnedFd, path::PathBuf, sync::Arc, time::Instant};

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use ferry_api::{
    MigrationPhase,
    run::{Fence, FenceSide, LockMode, PhaseTiming, RestoreAnswer, RestoreStatus},
};
use futures::StreamExt as _;
use tracing::{Instrument as _, info, info_span, warn};

use super::{Ctx, Refusal, authorize, cmd, images::Receiver, lazy};
use crate::runtime::{
    Kind, RuntimeError,
    driver::{Restore, RuncRecord},
};

/// Largest image stream accepted.
pub const MAX_IMAGE_BYTES: u64 = 16 << 30;

/// The migration's container, if it is coming here and is prepared.
async fn expect(ctx: &Ctx, id: &str) -> Result<(Ipv4Addr, PathBuf), Refusal> {
    let node = ctx.node.lock().await;
    let m = node
        .registry
        .as_ref()
        .and_then(|s| s.migrations.iter().find(|m| m.id == id))
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_migration",
                format!("host {} knows no active migration {id}", ctx.host),
            )
        })?;
    if m.to != ctx.host {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "wrong_destination",
            format!("migration {id} goes to {}, not to {}", m.to, ctx.host),
        ));
    }
    if !matches!(m.phase, MigrationPhase::Prepared | MigrationPhase::Frozen) {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "bad_phase",
            format!("migration {id} is {}: nothing to restore", m.phase),
        ));
    }
    let netns = node
        .applied
        .containers
        .get(&m.container)
        .map(|(_, b)| b.netns.clone())
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::CONFLICT,
                "not_local",
                format!(
                    "container {} is not built on {} yet (prepare not applied?)",
                    m.container, ctx.host
                ),
            )
        })?;
    Ok((m.container, netns))
}

/// `GET /v1/restores/{migration}`: how far its restore got here.
pub async fn status(
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<RestoreStatus>, Refusal> {
    authorize(&ctx.token, &headers)?;
    super::migration_param(&id)?;
    let known = ctx
        .restores
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .cloned();
    Ok(Json(known.unwrap_or(RestoreStatus {
        migration: id,
        state: "none".into(),
        bytes: 0,
        error: None,
    })))
}

/// `POST /v1/images/{migration}`.
pub async fn receive(
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RestoreAnswer>, Refusal> {
    authorize(&ctx.token, &headers)?;
    super::migration_param(&id)?;
    let (ip, netns) = expect(&ctx, &id).await?;
    if ctx.runtime.pid(ip).is_some() {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("container {ip} already runs on {}", ctx.host),
        ));
    }
    let busy = ctx.claim(ip)?;
    let span = info_span!("restore", migration = %id, container = %ip, host = %ctx.host);
    let dir = ctx.criu.work_dir.join(format!("{id}-restore"));
    // In a task of its own, so that a restore is not dropped half way if the source's
    // connection goes away.
    let task = tokio::spawn(
        async move {
            let _busy = busy;
            ctx.restore_status(&id, |s| {
                s.state = "receiving".into();
                s.bytes = 0;
                s.error = None;
            });
            let r = restore(&ctx, &id, ip, netns, &dir, body).await;
            if let Err(e) = &r {
                ctx.restore_status(&id, |s| {
                    s.state = "failed".into();
                    s.error = Some(e.2.clone());
                });
            }
            let (answer, lazy_daemon) = match r {
                Ok((a, l)) => (Ok(a), l),
                Err(e) => (Err(e), None),
            };
            match lazy_daemon {
                // The pages still come: the images go once the daemon is done with them.
                Some(daemon) => {
                    let keep = ctx.criu.keep_images;
                    tokio::spawn(
                        async move {
                            match daemon.finish().await {
                                Ok(e) if e.ok => {
                                    info!(after_restore_ms = e.after_ready_ms, "lazy pages: the last page arrived")
                                }
                                Ok(e) => {
                                    warn!(status = %e.status, "lazy pages: the daemon failed before the last page")
                                }
                                Err(e) => warn!(error = %e, "lazy pages: waiting for the daemon"),
                            }
                            if !keep {
                                let _ = std::fs::remove_dir_all(&dir);
                            }
                        }
                        .in_current_span(),
                    );
                }
                None => {
                    if !ctx.criu.keep_images {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            }
            answer
        }
        .instrument(span),
    );
    task.await
        .map_err(|e| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the restore task failed: {e}"),
            )
        })?
        .map(Json)
}

async fn restore(
    ctx: &Arc<Ctx>,
    id: &str,
    ip: Ipv4Addr,
    netns: PathBuf,
    dir: &std::path::Path,
    body: Body,
) -> Result<(RestoreAnswer, Option<lazy::Serving>), Refusal> {
    let failed = |code: &'static str, m: String| {
        warn!(error = %m, "restore refused");
        Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, code, m)
    };
    let _ = std::fs::remove_dir_all(dir);
    // Images hold the container's memory: root only (the work directory too).
    ferry_api::private::create_dir(&ctx.criu.work_dir)
        .and_then(|()| ferry_api::private::create_dir(dir))
        .map_err(|e| failed("internal", format!("creating {}: {e}", dir.display())))?;

    // Receive.
    let transfer_start = ferry_api::unix_ms_f64();
    let t = Instant::now();
    let mut rx = Receiver::new(dir, MAX_IMAGE_BYTES);
    let mut stream = body.into_data_stream();
    let mut checked = false;
    while let Some(chunk) = stream.next().await {
        // The header comes first: a runtime or an image this host lacks is refused before
        // the images are received.
        if !checked && let Some(h) = &rx.header {
            checked = true;
            check_runtime(ctx, h)?;
        }
        let chunk = chunk.map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "transfer_failed",
                format!("reading the image stream: {e}"),
            )
        })?;
        rx.feed(&chunk).map_err(|e| {
            Refusal::new(StatusCode::BAD_REQUEST, "bad_image_stream", e.to_string())
        })?;
        let bytes = rx.bytes;
        ctx.restore_status(id, |s| s.bytes = bytes);
    }
    let header = rx
        .finish()
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "bad_image_stream", e.to_string()))?
        .clone();
    if !checked {
        check_runtime(ctx, &header)?;
    }
    if header.migration != id || header.container != ip {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_image_stream",
            format!(
                "the stream is migration {} of {}, the path says {id} of {ip}",
                header.migration, header.container
            ),
        ));
    }
    // Lazy memory: the pages come from the source host's own page server, nowhere else.
    if let Some(l) = &header.lazy {
        check_page_server(ctx, &header.from, l.page_server).await?;
    }
    let transfer = PhaseTiming {
        name: "transfer".into(),
        start_unix_ms: transfer_start,
        ms: t.elapsed().as_secs_f64() * 1e3,
        bytes: Some(rx.bytes),
    };
    info!(
        bytes = rx.bytes,
        files = rx.files,
        ms = transfer.ms,
        "images received"
    );

    ferry_api::faultpoint::pause("restore", id).await;
    // Decided meanwhile (aborted: the source runs again)? Then nothing is restored.
    match ctx.phase_here(id).await {
        Some(MigrationPhase::Prepared | MigrationPhase::Frozen) => {}
        other => {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "bad_phase",
                format!(
                    "migration {id} is {} here now: not restoring",
                    other.map_or("gone".to_string(), |p| p.to_string())
                ),
            ));
        }
    }
    ctx.restore_status(id, |s| s.state = "restoring".into());
    // Restore into the prepared namespace. A namespace this host kept (the container left
    // it moments ago, and comes back while the forwarding grace runs) may still carry the
    // drop-all table of CRIU's own network lock from that dump: remove it first.
    if let Err(e) = tokio::task::spawn_blocking({
        let netns = netns.clone();
        move || remove_criu_lock_tables(&netns)
    })
    .await
    .unwrap_or_else(|e| Err(e.into()))
    {
        return Err(failed("restore_failed", e.to_string()));
    }
    let runtime = header.runtime;
    let prepared = {
        let (rt, netns, dir) = (ctx.runtime.clone(), netns.clone(), dir.to_owned());
        let (lock, criu, image, argv) = (
            header.lock,
            ctx.criu.binary.clone(),
            header.image.clone(),
            header.argv.clone(),
        );
        tokio::task::spawn_blocking(move || {
            rt.driver(runtime)?.restore(&Restore {
                ip,
                dir: &dir,
                netns: &netns,
                lock,
                criu: &criu,
                image: image.as_deref(),
                argv: &argv,
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(RuntimeError::BadRequest(format!(
                "the restore's preparation failed: {e}"
            )))
        })
    };
    let (mut restore, record) =
        prepared.map_err(|e| failed("restore_failed", format!("{runtime} restore: {e}")))?;
    // Lazy memory: CRIU's lazy-pages daemon connects to the source's page server first; the
    // restore then faults the pages in through it (dropped: killed, on any failure below).
    let mut lazy_daemon = None;
    if let Some(l) = &header.lazy {
        let args = lazy::lazy_pages_args(dir, l.page_server, ctx.tls.as_ref());
        let log = dir.join("lazy-pages.log");
        match lazy::spawn_ready(&ctx.criu.binary, &args, &[], &log).await {
            Ok(Ok(s)) => {
                info!(page_server = %l.page_server, ms = s.ready_ms, "lazy-pages daemon connected");
                lazy_daemon = Some(s);
            }
            Ok(Err(o)) => {
                let _ = undo_prepared(ctx, runtime, record.clone()).await;
                return Err(failed("restore_failed", o.failure("criu lazy-pages")));
            }
            Err(e) => {
                let _ = undo_prepared(ctx, runtime, record.clone()).await;
                return Err(failed(
                    "restore_failed",
                    format!("starting criu lazy-pages: {e}"),
                ));
            }
        }
        restore.args.push("--lazy-pages".into());
    }
    // Whatever the runtime prepared goes if the restore does not get through.
    let undo = |ctx: &Arc<Ctx>, rec: Option<RuncRecord>| {
        let rt = ctx.runtime.clone();
        tokio::task::spawn_blocking(move || {
            if let Ok(d) = rt.driver(runtime) {
                d.restore_failed(rec.as_ref());
            }
        })
    };
    let ns: Option<OwnedFd> = if restore.netns_fd {
        Some(
            std::fs::File::open(&netns)
                .map_err(|e| failed("internal", format!("{}: {e}", netns.display())))?
                .into(),
        )
    } else {
        None
    };
    let mut env = ctx.script_env(id, ip, "restore");
    env.extend(restore.env.iter().cloned());
    if header.fail_restore {
        if runtime == ferry_api::run::RuntimeKind::Podman {
            // Podman passes CRIU no environment: the hook fails at post-restore instead.
            ferry_api::faultpoint::arm_once(ferry_api::faultpoint::FAIL_POST_RESTORE)
                .map_err(|e| failed("bad_request", format!("--fail restore under Podman: {e}")))?;
        } else {
            env.push(("CRIU_FAULT".into(), cmd::FAULT_POST_RESTORE.into()));
        }
    }
    // The restored tree is fenced: stopped (`--leave-stopped`), and whatever its kernel
    // emits is dropped, until the release reaches this host.
    ctx.node.lock().await.fence_egress(ip, true);
    let start = ferry_api::unix_ms_f64();
    let out = cmd::run(
        &restore.program,
        &restore.args,
        &env,
        ns.as_ref(),
        &restore.log,
        restore.capture,
    )
    .await;
    let out = match out {
        Ok(o) if o.ok => o,
        Ok(o) => {
            ctx.node.lock().await.fence_egress(ip, false);
            let _ = undo(ctx, record.clone()).await;
            return Err(failed("restore_failed", o.failure(restore.name)));
        }
        Err(e) => {
            ctx.node.lock().await.fence_egress(ip, false);
            let _ = undo(ctx, record.clone()).await;
            return Err(failed(
                "restore_failed",
                format!("starting {}: {e}", restore.program.display()),
            ));
        }
    };
    // The restored tree's root, as the runtime knows it (a PID file; Podman's inspect).
    let restored = {
        let (rt, inv, stdout, rec) = (
            ctx.runtime.clone(),
            restore.clone(),
            out.stdout.clone(),
            record.clone(),
        );
        tokio::task::spawn_blocking(move || {
            rt.driver(runtime)
                .map_err(|e| e.to_string())?
                .restored(&inv, &stdout, rec)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    let (pid, record) = match restored {
        Ok(r) => r,
        Err(e) => {
            ctx.node.lock().await.fence_egress(ip, false);
            let _ = undo(ctx, record.clone()).await;
            return Err(failed("restore_failed", format!("{runtime} restore: {e}")));
        }
    };
    let fence = Fence {
        migration: id.to_owned(),
        side: FenceSide::Destination,
    };
    let kind = Kind {
        runtime,
        image: header.image.clone(),
        runc: record.clone(),
    };
    if let Err(e) = ctx.runtime.adopt(ip, pid, header.argv.clone(), kind) {
        // Not ours to run: a copy the runtime cannot track must not live.
        warn!(pid, error = %e, "adopting the restored tree failed: killing it");
        let _ = super::resume::kill(pid);
        let _ = undo(ctx, record.clone()).await;
        ctx.node.lock().await.fence_egress(ip, false);
        return Err(failed("restore_failed", format!("adopting PID {pid}: {e}")));
    }
    ctx.runtime.fence(ip, fence);
    ctx.restore_status(id, |s| s.state = "restored".into());
    let log = std::fs::read_to_string(&restore.log).unwrap_or_default();
    let resumed = start + cmd::log_offset_ms(&log, cmd::LOG_RESUMED).unwrap_or(out.ms);
    let mut stats = ferry_api::run::CriuStats::default();
    super::source::read_stats(&restore.stats, &out.stdout, &mut stats);
    let restore_phase = PhaseTiming {
        name: "restore".into(),
        start_unix_ms: start,
        ms: out.ms,
        bytes: None,
    };
    info!(pid, ms = out.ms, "restored");
    // The datagrams that waited in the source's UDP sockets, back in the restored ones
    // before the release delivers the held ones (`super::udpq`).
    requeue_udp(dir, &netns, pid, ip).await;

    ferry_api::faultpoint::pause("release", id).await;
    // Release: the gateway's decision. Asked for until it is decided either way (a gateway
    // restarting or a link cut only delays it); the fencing acts on the decision when it
    // reaches this host through the registry (released: SIGCONT; aborted: SIGKILL), so
    // "applied" here means the tree runs.
    let client = ctx.gateway_client();
    let release_start = ferry_api::unix_ms_f64();
    let t = Instant::now();
    let release_error = ask_release(ctx, &client, id, header.lock).await.err();
    let release = PhaseTiming {
        name: "release".into(),
        start_unix_ms: release_start,
        ms: t.elapsed().as_secs_f64() * 1e3,
        bytes: None,
    };
    match &release_error {
        None => info!(ms = release.ms, "released"),
        Some(e) => warn!(error = %e, "restored but not released"),
    }
    Ok((
        RestoreAnswer {
            pid,
            resumed_unix_ms: resumed,
            release: Some(release),
            release_error,
            bytes: rx.bytes,
            files: rx.files,
            transfer,
            restore: restore_phase,
            criu_restore_ms: stats.restore_ms,
            pages_restored: stats.pages_restored,
        },
        lazy_daemon,
    ))
}

/// What a runtime prepared for a restore that will not happen goes.
fn undo_prepared(
    ctx: &Arc<Ctx>,
    runtime: ferry_api::run::RuntimeKind,
    rec: Option<RuncRecord>,
) -> tokio::task::JoinHandle<()> {
    let rt = ctx.runtime.clone();
    tokio::task::spawn_blocking(move || {
        if let Ok(d) = rt.driver(runtime) {
            d.restore_failed(rec.as_ref());
        }
    })
}

/// Writes back the datagrams the source found waiting in the container's UDP sockets (the
/// image stream's [`super::udpq::FILE`], if any). Failures are logged with their counts:
/// what is not written back is lost, and said so.
async fn requeue_udp(dir: &std::path::Path, netns: &std::path::Path, pid: i32, ip: Ipv4Addr) {
    let file = dir.join(super::udpq::FILE);
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!(error = %e, "reading the carried UDP datagrams: they are lost");
            return;
        }
    };
    let carried = match super::udpq::decode(&bytes) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "the carried UDP datagrams are unreadable: they are lost");
            return;
        }
    };
    let n = carried.datagrams.len();
    let netns = netns.to_owned();
    let r = tokio::task::spawn_blocking(move || {
        let sent = if carried.datagrams.is_empty() {
            (0, None)
        } else {
            super::udpq::inject(&netns, carried.datagrams)
        };
        // CRIU recreated the sockets with the size the checkpoint widened them to: theirs
        // again, once the datagrams are in (the queue may stay above it until read).
        let widened: Vec<super::udpq::Widened> = carried
            .sockets
            .iter()
            .map(|&(local, rcvbuf)| super::udpq::Widened {
                ino: 0,
                local,
                rcvbuf,
            })
            .collect();
        let narrowed = super::udpq::narrow_tree(pid, ip, &widened, true);
        (sent, widened.len(), narrowed)
    })
    .await;
    use super::udpq::{Event, count};
    match r {
        Err(e) => {
            count(Event::Lost, n);
            warn!(datagrams = n, error = %e, "writing back the carried UDP datagrams");
        }
        Ok(((sent, failed), wide, (narrowed, errors))) => {
            count(Event::WrittenBack, sent);
            match failed {
                None => info!(
                    datagrams = sent,
                    "UDP datagrams written back into the restored sockets"
                ),
                Some(e) => {
                    count(Event::Lost, n - sent);
                    warn!(datagrams = n, sent, error = %e, "writing back the carried UDP datagrams");
                }
            }
            if narrowed < wide || !errors.is_empty() {
                warn!(widened = wide, narrowed, errors = ?errors, "giving the restored UDP sockets their receive buffers back");
            }
        }
    }
}

/// A lazy stream's page server must be the source host's registered vtep (what its agent
/// picked); anything else is refused before anything is restored.
async fn check_page_server(
    ctx: &Ctx,
    from: &str,
    page_server: std::net::SocketAddr,
) -> Result<(), Refusal> {
    let vtep = {
        let node = ctx.node.lock().await;
        node.registry
            .as_ref()
            .and_then(|s| s.hosts.iter().find(|h| h.name == from).map(|h| h.vtep))
    };
    match vtep {
        Some(v) if std::net::IpAddr::V4(v) == page_server.ip() && page_server.port() != 0 => Ok(()),
        _ => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_image_stream",
            format!(
                "page server {page_server}: not host {from}'s registered address \
                 (lazy pages come only from the source host)"
            ),
        )),
    }
}

/// The stream's runtime must be available here, and (runc) its image too: refused, naming
/// what is missing, before anything is restored.
fn check_runtime(ctx: &Ctx, h: &super::images::Header) -> Result<(), Refusal> {
    let refuse = |e: RuntimeError| {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        warn!(error = %e, "restore refused");
        Refusal::new(status, e.code(), e.to_string())
    };
    ctx.runtime.driver(h.runtime).map_err(refuse)?;
    if h.runtime == ferry_api::run::RuntimeKind::Runc {
        let Some(image) = &h.image else {
            return Err(refuse(RuntimeError::BadRequest(
                "a runc container's images came without its image name".into(),
            )));
        };
        ctx.runtime.has_image(image).map_err(refuse)?;
    }
    Ok(())
}

/// Longest pause between two release requests.
const RELEASE_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks the gateway to release (criu-lock: freeze, then release) until it answers with a
/// decision: `Ok` (released, and applied here), or `Err` with why not (aborted meanwhile, or
/// the release was refused). Transport failures and 5xx answers are retried with back-off for
/// as long as the migration is undecided in this host's snapshot.
async fn ask_release(
    ctx: &Ctx,
    client: &ferry_api::Client,
    id: &str,
    lock: LockMode,
) -> Result<(), String> {
    let mut backoff = std::time::Duration::from_millis(20);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let r = async {
            if lock == LockMode::CriuLock {
                client
                    .freeze_migration(id, None)
                    .await
                    .map_err(|e| ("freeze (switch)", e))?;
            }
            client
                .release_migration(id, None)
                .await
                .map_err(|e| ("release", e))
        }
        .await;
        let (what, e) = match r {
            Ok(_) => return Ok(()),
            Err(x) => x,
        };
        // A 4xx is the gateway's answer (aborted, unknown): final. Anything else (no
        // connection, 5xx, needs_attention while agents lag) is retried while undecided.
        let status = match &e {
            ferry_api::ApiError::Http { status, .. } => Some(*status),
            _ => None,
        };
        if status.is_some_and(|s| (400..500).contains(&s)) {
            return Err(format!("{what} refused: {e}"));
        }
        match ctx.phase_here(id).await {
            Some(MigrationPhase::Prepared | MigrationPhase::Frozen) => {}
            Some(MigrationPhase::Released) => return Ok(()),
            other => {
                return Err(format!(
                    "{what} failed ({e}); the migration is {} here now",
                    other.map_or("gone (aborted)".to_string(), |p| p.to_string())
                ));
            }
        }
        warn!(attempts, error = %e, "{what} not answered yet: retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RELEASE_BACKOFF_MAX);
    }
}

/// Why CRIU's network-lock tables could not be removed.
#[derive(Debug, thiserror::Error)]
enum NftError {
    #[error(transparent)]
    NetNs(#[from] ferry_overlay::netns::NetNsError),
    #[error("running nft: {0}")]
    Run(#[source] std::io::Error),
    #[error("nft {args}: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("the nft task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Deletes the `CRIU-*` nftables tables (CRIU's network lock) inside a namespace.
fn remove_criu_lock_tables(netns: &std::path::Path) -> Result<(), NftError> {
    let nft = |args: &[&str]| -> Result<String, NftError> {
        let mut cmd = std::process::Command::new("nft");
        cmd.args(args);
        ferry_overlay::netns::command_in(&mut cmd, netns)?;
        let out = cmd.output().map_err(NftError::Run)?;
        if !out.status.success() {
            return Err(NftError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let tables = match nft(&["list", "tables"]) {
        Ok(t) => t,
        // No nft at all: there can be no CRIU nft lock either.
        Err(NftError::Run(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    for line in tables.lines() {
        // "table inet CRIU-<uuid>"
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["table", family, name] = words[..]
            && name.starts_with("CRIU")
        {
            nft(&["delete", "table", family, name])?;
            info!(table = name, "removed a stale CRIU network-lock table");
        }
    }
    Ok(())
}
