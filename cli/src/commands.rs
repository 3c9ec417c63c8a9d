//! What each `ferry` command does. Every command produces an [`Outcome`] (a JSON document and
//! its text rendering) or a [`CliError`] (code and message); [`run`] prints one of them and
//! returns the exit code.

use std::{
    collections::BTreeMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use ferry_api::{
    ApiError, Client, EndpointSpec, ErrorBody, HostRole, HostStatus, Migration, MigrationFailure,
    MigrationPhase, MigrationStep, MigrationStepKind, run::RunRequest, validate::public_spec,
};
use serde::Serialize;
use serde_json::Value;

use crate::cli::{
    Cli, Command, EndpointCommand, GatewayArgs, MigrateCommand, PublicCommand, StepArgs,
};

/// A command's result: one JSON document, and the same for people.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub json: Value,
    pub text: String,
    /// The exit code (0; `ferry migrate run` reports a rolled-back run as 3 with its report).
    pub exit: u8,
}

impl Outcome {
    pub fn new(json: impl Serialize, text: impl Into<String>) -> Result<Self, CliError> {
        let json = serde_json::to_value(json)
            .map_err(|e| CliError::new("internal", format!("encoding the answer: {e}")))?;
        Ok(Self {
            json,
            text: text.into(),
            exit: 0,
        })
    }
}

/// A failure: `code` is the API's error code for an answer of the gateway, else one of
/// `unreachable`, `timeout`, `io`, `protocol`, `bad_response`, `token_file`, `sync_timeout`,
/// `invalid_config`, `gateway_failed`, `usage`, `internal`, `tls`, `unknown_migration` (no migration
/// of that container), `needs_attention` (a migration step whose answer was lost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub code: String,
    pub message: String,
    /// The HTTP status, when the gateway refused the request.
    pub status: Option<u16>,
    /// Where a failed migration step left things (`rolled_back`, `needs_attention`).
    pub migration: Option<Box<MigrationFailure>>,
}

impl CliError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            status: None,
            migration: None,
        }
    }

    /// 3 for `rolled_back`, 4 for `needs_attention`, else 1 (usage errors, 2, are clap's).
    pub fn exit_code(&self) -> u8 {
        match self.code.as_str() {
            "rolled_back" => 3,
            "needs_attention" => 4,
            _ => 1,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} ({}, HTTP {s})", self.message, self.code),
            None => f.write_str(&self.message),
        }
    }
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> Self {
        if let ApiError::Http {
            status,
            code,
            message,
            migration,
        } = e
        {
            return Self {
                code: code.unwrap_or_else(|| "http".into()),
                message,
                status: Some(status),
                migration,
            };
        }
        let code = match &e {
            ApiError::Http { .. } => "http",
            ApiError::Connect { .. } => "unreachable",
            ApiError::Timeout { .. } => "timeout",
            ApiError::Io { .. } => "io",
            ApiError::Protocol { .. } => "protocol",
            ApiError::Decode { .. } => "bad_response",
            ApiError::TokenFile { .. } => "token_file",
            ApiError::Tls { .. } => "tls",
        };
        Self::new(code, e.to_string())
    }
}

/// Runs the command line and returns the exit code.
pub fn run(cli: Cli) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return report(
                cli.json,
                Err(CliError::new("internal", format!("starting runtime: {e}"))),
            );
        }
    };
    let json = cli.json;
    let result = rt.block_on(execute(cli));
    report(json, result)
}

/// Prints the outcome; the exit code.
fn report(json: bool, result: Result<Option<Outcome>, CliError>) -> ExitCode {
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(o)) => {
            if json {
                println!("{}", o.json);
            } else if !o.text.is_empty() {
                println!("{}", o.text.trim_end());
            }
            ExitCode::from(o.exit)
        }
        Err(e) => {
            let exit = e.exit_code();
            if json {
                let mut body = ErrorBody::new(e.code, e.message);
                body.error.migration = e.migration;
                println!(
                    "{}",
                    serde_json::to_string(&body).unwrap_or_else(|_| "{}".into())
                );
            } else {
                eprintln!("ferry: {e}");
                if let Some(f) = &e.migration {
                    eprintln!(
                        "ferry: migration {} is now {} (registry version {})",
                        f.migration.id, f.migration.phase, f.version
                    );
                }
            }
            ExitCode::from(exit)
        }
    }
}

/// `Ok(None)`: nothing to print (the daemon ran and stopped cleanly).
pub async fn execute(cli: Cli) -> Result<Option<Outcome>, CliError> {
    let (files, plaintext) = (cli.tls_files(), cli.insecure_plaintext);
    let (gateways, token_file) = (cli.gateway.clone(), cli.token_file.clone());
    let gateway_addr = gateways.first();
    let tls = || -> Result<_, CliError> {
        if plaintext {
            return Ok(None);
        }
        let tls = ferry_tls::Tls::load(&files).map_err(|e| {
            CliError::new(
                "tls",
                format!(
                    "TLS: {e} (this client's identity: --tls-dir, FERRY_TLS_DIR; ferry certs \
                     issue operator makes one)"
                ),
            )
        })?;
        Ok(Some(tls.client_config()))
    };
    let client = || {
        Ok::<_, CliError>(
            Client::with_token_file(gateway_addr, &token_file)
                .map_err(CliError::from)?
                .with_fallbacks(gateways.rest())
                .with_tls(tls()?),
        )
    };
    match cli.command {
        Command::Gateway(args) => gateway(args).await,
        Command::Certs(cmd) => crate::certs::run(cmd).map(Some),
        Command::Health => health(
            &Client::new(gateway_addr, None)
                .with_fallbacks(gateways.rest())
                .with_tls(tls()?),
        )
        .await
        .map(Some),
        Command::Hosts => hosts(&client()?).await.map(Some),
        Command::Endpoint(cmd) => endpoint(&client()?, cmd).await.map(Some),
        Command::Public(cmd) => public(&client()?, cmd).await.map(Some),
        Command::Migrate(MigrateCommand::Run {
            container,
            to,
            lock,
            fail,
            runtime,
            memory,
            quiet,
        }) => crate::runcmd::run(
            &client()?,
            RunRequest {
                container,
                to,
                lock: lock.into(),
                fail: fail.map(Into::into),
                runtime: runtime.map(Into::into),
                memory: memory.into(),
            },
            quiet,
        )
        .await
        .map(Some),
        Command::Migrate(cmd) => migrate(client()?, cmd).await.map(Some),
        Command::ActionScript => crate::runcmd::action_script(client).await,
        Command::Sync { timeout_ms } => sync(&client()?, Duration::from_millis(timeout_ms))
            .await
            .map(Some),
    }
}

async fn gateway(args: GatewayArgs) -> Result<Option<Outcome>, CliError> {
    if args.check || args.import.is_some() {
        // Reading (and importing into) etcd blocks: not on a runtime worker.
        let (config, store, import) =
            (args.config.clone(), args.store.clone(), args.import.clone());
        let r = tokio::task::spawn_blocking(move || match &import {
            Some(dir) => ferry_gateway::daemon::import(&config, store.as_deref(), dir)
                .map_err(|e| CliError::new("import_failed", e.to_string())),
            None => ferry_gateway::check(&config, store.as_deref())
                .map_err(|e| CliError::new("invalid_config", e.to_string())),
        })
        .await
        .map_err(|e| CliError::new("internal", e.to_string()))??;
        if args.import.is_some() {
            let text = format!(
                "imported registry version {} ({} hosts, {} endpoints, {} public mappings, {} \
                 migrations in progress) from {} into {}",
                r.version,
                r.hosts,
                r.endpoints,
                r.public,
                r.migrations,
                r.state_file.display(),
                r.store
            );
            return Outcome::new(r, text).map(Some);
        }
        let state = if r.state_exists {
            format!(
                "registry version {} ({} hosts, {} endpoints, {} public mappings, {} migrations \
                 in progress) in {}",
                r.version, r.hosts, r.endpoints, r.public, r.migrations, r.store
            )
        } else {
            format!("no state yet ({} will be created)", r.store)
        };
        let text = format!(
            "config {} is valid: listen {}, {state}",
            r.config.display(),
            r.listen
        );
        return Outcome::new(r, text).map(Some);
    }
    ferry_gateway::serve(&args.config, args.store.as_deref())
        .await
        .map_err(|e| CliError::new("gateway_failed", e.to_string()))?;
    Ok(None)
}

async fn health(c: &Client) -> Result<Outcome, CliError> {
    let h = c.health().await?;
    let text = format!(
        "gateway {}: {} (api {}, ferry {})",
        c.addr(),
        h.status,
        h.api,
        h.version
    );
    Outcome::new(h, text)
}

#[derive(Serialize)]
struct HostsReport {
    version: u64,
    hosts: Vec<HostStatus>,
}

async fn hosts(c: &Client) -> Result<Outcome, CliError> {
    let version = c.version().await?;
    let hosts = c.hosts().await?;
    let now = ferry_api::unix_ms();
    let facing = ferry_api::public_gateway(hosts.iter().map(|h| &h.info)).map(|h| h.name.clone());
    let rows = hosts
        .iter()
        .map(|h| {
            vec![
                h.info.name.clone(),
                match h.info.role {
                    HostRole::Host => "host".into(),
                    // Several gateway-role hosts: one faces the internet, the others stand by.
                    HostRole::Gateway if facing.as_deref() == Some(h.info.name.as_str()) => {
                        "gateway".into()
                    }
                    HostRole::Gateway => "gateway (standby)".into(),
                },
                h.info.vtep.to_string(),
                h.info.overlay_ip.to_string(),
                format!(
                    "{}/{version} {}",
                    h.applied_version,
                    if h.applied_version == version {
                        "in sync"
                    } else {
                        "behind"
                    }
                ),
                if h.connected { "yes" } else { "no" }.into(),
                ago(now, h.last_seen_unix_ms),
            ]
        })
        .collect();
    let text = if hosts.is_empty() {
        format!("no hosts registered (registry version {version})")
    } else {
        table(
            &[
                "NAME",
                "ROLE",
                "VTEP",
                "OVERLAY IP",
                "APPLIED",
                "CONNECTED",
                "LAST SEEN",
            ],
            rows,
        )
    };
    Outcome::new(HostsReport { version, hosts }, text)
}

async fn endpoint(c: &Client, cmd: EndpointCommand) -> Result<Outcome, CliError> {
    match cmd {
        EndpointCommand::Add { ip, host, mac } => {
            let added = c.add_endpoints(&[EndpointSpec { ip, host, mac }]).await?;
            let e = added
                .into_iter()
                .next()
                .ok_or_else(|| CliError::new("bad_response", "the gateway answered no endpoint"))?;
            let text = format!("endpoint {} added on host {} (mac {})", e.ip, e.host, e.mac);
            Outcome::new(e, text)
        }
        EndpointCommand::Rm { ip } => {
            let e = c.remove_endpoint(ip).await?;
            let text = format!(
                "endpoint {} removed from host {} (its public mappings are kept)",
                e.ip, e.host
            );
            Outcome::new(e, text)
        }
        EndpointCommand::List => {
            let eps = c.endpoints().await?;
            let text = if eps.is_empty() {
                "no endpoints".to_string()
            } else {
                table(
                    &["IP", "HOST", "MAC"],
                    eps.iter()
                        .map(|e| vec![e.ip.to_string(), e.host.clone(), e.mac.to_string()])
                        .collect(),
                )
            };
            Outcome::new(eps, text)
        }
    }
}

fn container_text(p: &ferry_api::PublicMapping) -> String {
    match p.container_port {
        Some(port) => format!("{}:{port}", p.container),
        None => p.container.to_string(),
    }
}

async fn public(c: &Client, cmd: PublicCommand) -> Result<Outcome, CliError> {
    match cmd {
        PublicCommand::Add { public, container } => {
            let spec = public_spec(public, container)
                .map_err(|m| CliError::new("usage", m.to_string()))?;
            let p = c.add_public(&spec).await?;
            let text = format!("public {} → {} added", p.key(), container_text(&p));
            Outcome::new(p, text)
        }
        PublicCommand::Rm { key } => {
            let p = c.remove_public(&key.to_string()).await?;
            let text = format!("public {} → {} removed", p.key(), container_text(&p));
            Outcome::new(p, text)
        }
        PublicCommand::List => {
            let list = c.public().await?;
            let hosts: BTreeMap<_, _> = c
                .endpoints()
                .await?
                .into_iter()
                .map(|e| (e.ip, e.host))
                .collect();
            let text = if list.is_empty() {
                "no public mappings".to_string()
            } else {
                table(
                    &["PUBLIC", "CONTAINER", "HOST"],
                    list.iter()
                        .map(|p| {
                            vec![
                                p.key(),
                                container_text(p),
                                hosts
                                    .get(&p.container)
                                    .cloned()
                                    .unwrap_or_else(|| "- (not an endpoint now)".into()),
                            ]
                        })
                        .collect(),
                )
            };
            Outcome::new(list, text)
        }
        PublicCommand::Takeover { host, from } => {
            let t = c.public_takeover(&host, &from).await?;
            let text = format!(
                "{} faces the internet (registry version {})",
                t.host.name, t.version
            );
            Outcome::new(t, text)
        }
    }
}

#[derive(Serialize)]
struct SyncReport {
    /// The registry version every host has now applied (at least).
    version: u64,
    hosts: Vec<String>,
    waited_ms: u64,
}

/// Reads the registry version once, then polls the hosts every 20 ms until each one's
/// `applied_version` has reached it.
async fn sync(c: &Client, timeout: Duration) -> Result<Outcome, CliError> {
    let start = Instant::now();
    let target = c.version().await?;
    loop {
        let hosts = c.hosts().await?;
        let behind: Vec<&HostStatus> = hosts
            .iter()
            .filter(|h| h.applied_version < target)
            .collect();
        let waited_ms = start.elapsed().as_millis() as u64;
        if behind.is_empty() {
            let names: Vec<String> = hosts.iter().map(|h| h.info.name.clone()).collect();
            let text = if names.is_empty() {
                format!("no hosts registered (registry version {target})")
            } else {
                format!(
                    "all {} hosts applied registry version {target} (waited {waited_ms} ms)",
                    names.len()
                )
            };
            return Outcome::new(
                SyncReport {
                    version: target,
                    hosts: names,
                    waited_ms,
                },
                text,
            );
        }
        if start.elapsed() >= timeout {
            let now = ferry_api::unix_ms();
            let list: Vec<String> = behind
                .iter()
                .map(|h| {
                    format!(
                        "{} (applied {}, {}, last seen {})",
                        h.info.name,
                        h.applied_version,
                        if h.connected {
                            "connected"
                        } else {
                            "not connected"
                        },
                        ago(now, h.last_seen_unix_ms)
                    )
                })
                .collect();
            return Err(CliError::new(
                "sync_timeout",
                format!(
                    "after {} ms, {} of {} hosts have not applied registry version {target}: {}",
                    timeout.as_millis(),
                    behind.len(),
                    hosts.len(),
                    list.join(", ")
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- migrate

async fn migrate(c: Client, cmd: MigrateCommand) -> Result<Outcome, CliError> {
    let ms = |t: Option<u64>| t.map(Duration::from_millis);
    match cmd {
        MigrateCommand::Prepare {
            container,
            to,
            wait,
        } => {
            let s = c
                .prepare_migration(container, &to, ms(wait.timeout_ms))
                .await
                .map_err(step_error)?;
            step_outcome(MigrationStepKind::Prepare, s)
        }
        MigrateCommand::Freeze(a) => migrate_step(&c, MigrationStepKind::Freeze, a).await,
        MigrateCommand::Release(a) => migrate_step(&c, MigrationStepKind::Release, a).await,
        MigrateCommand::Abort(a) => migrate_step(&c, MigrationStepKind::Abort, a).await,
        MigrateCommand::Run { .. } => unreachable!("handled by execute"),
        MigrateCommand::Status {
            container,
            all,
            timeout_ms,
        } => {
            let c = match ms(timeout_ms) {
                Some(t) => c.timeout(t),
                None => c,
            };
            migrate_status(&c, container, all).await
        }
    }
}

/// A step's error. An answer lost after the request was sent (timeout, broken connection,
/// garbled answer) leaves the outcome unknown: `needs_attention` (exit 4), not "nothing
/// changed".
fn step_error(e: ApiError) -> CliError {
    match e {
        ApiError::Timeout { .. }
        | ApiError::Io { .. }
        | ApiError::Protocol { .. }
        | ApiError::Decode { .. } => CliError::new(
            "needs_attention",
            format!(
                "{e}: the step's outcome is unknown (the gateway may have applied it): check \
                 `ferry migrate status`"
            ),
        ),
        other => other.into(),
    }
}

async fn migrate_step(
    c: &Client,
    step: MigrationStepKind,
    a: StepArgs,
) -> Result<Outcome, CliError> {
    let id = match (a.target.id, a.target.container) {
        (Some(id), _) => id,
        (None, Some(ip)) => match c.latest_migration(ip).await? {
            Some(m) => m.id,
            None => {
                return Err(CliError::new(
                    "unknown_migration",
                    format!(
                        "container {ip} has no migration (start one with `ferry migrate prepare \
                         --container {ip} --to HOST`)"
                    ),
                ));
            }
        },
        (None, None) => return Err(CliError::new("usage", "give --container or --id")),
    };
    let s = c
        .migration_step(&id, step, a.wait.timeout_ms.map(Duration::from_millis))
        .await
        .map_err(step_error)?;
    step_outcome(step, s)
}

fn step_outcome(step: MigrationStepKind, s: MigrationStep) -> Result<Outcome, CliError> {
    let m = &s.migration;
    let head = format!("{}: {} {} → {}", m.id, m.container, m.from, m.to);
    let mut text = if s.changed {
        format!("{head} {}", m.phase)
    } else {
        format!("{head} is already {} (nothing changed)", m.phase)
    };
    if step == MigrationStepKind::Release && m.phase == MigrationPhase::Released {
        text.push_str(&format!(
            "; the endpoint is on {}; {} forwards stragglers for {} ms",
            m.to,
            m.from,
            m.forward_until_unix_ms.saturating_sub(m.released_unix_ms)
        ));
    }
    if m.phase == MigrationPhase::Aborted {
        text.push_str(&format!("; the container stays on {}", m.from));
    }
    if s.hosts.is_empty() {
        text.push_str(&format!(" (registry version {})", s.version));
    } else {
        text.push_str(&format!(
            "; applied by {} in {} ms (registry version {})",
            s.hosts.join(", "),
            s.applied_ms,
            s.version
        ));
    }
    Outcome::new(s, text)
}

async fn migrate_status(
    c: &Client,
    container: Option<std::net::Ipv4Addr>,
    all: bool,
) -> Result<Outcome, CliError> {
    let now = ferry_api::unix_ms();
    let list: Vec<Migration> = match (container, all) {
        (Some(ip), true) => c.container_migrations(ip, false).await?,
        (Some(ip), false) => c.latest_migration(ip).await?.into_iter().collect(),
        (None, true) => c.migrations().await?,
        (None, false) => c
            .migrations()
            .await?
            .into_iter()
            .filter(|m| {
                m.phase.is_active()
                    || (m.phase == MigrationPhase::Released && m.forward_until_unix_ms > now)
            })
            .collect(),
    };
    let mut text = if list.is_empty() {
        match (container, all) {
            (Some(ip), _) => format!("container {ip} has no migration"),
            (None, true) => "no migrations".to_string(),
            (None, false) => "no migrations in progress".to_string(),
        }
    } else {
        migration_table(&list, now)
    };
    // Where it runs: the registry's endpoint host is the one copy allowed to run (fencing
    // keeps any other copy stopped until the registry decides).
    if let Some(ip) = container {
        let owner = c
            .endpoints()
            .await?
            .into_iter()
            .find(|e| e.ip == ip)
            .map(|e| e.host);
        let pending = list.iter().find(|m| m.phase.is_active());
        let line = match (owner, pending) {
            (Some(h), Some(m)) => format!(
                "\n{ip} runs on {h}; migration {} to {} is {} (a copy on {} stays stopped until it is released)",
                m.id, m.to, m.phase, m.to
            ),
            (Some(h), None) => format!("\n{ip} runs on {h}"),
            (None, _) => format!("\n{ip} is not an endpoint"),
        };
        text.push_str(&line);
    }
    Outcome::new(list, text)
}

/// `+350ms`, `+1.2s`, `+3m`: how long after `start` `t` was (`-` if `t` is 0).
fn after(start: u64, t: u64) -> String {
    if t == 0 {
        return "-".into();
    }
    let d = t.saturating_sub(start);
    match d {
        0..1000 => format!("+{d}ms"),
        1000..120_000 => format!("+{:.1}s", d as f64 / 1000.0),
        _ => format!("+{}m", d / 60_000),
    }
}

fn migration_table(list: &[Migration], now: u64) -> String {
    let rows = list
        .iter()
        .map(|m| {
            let note = match m.phase {
                MigrationPhase::Released if m.forward_until_unix_ms > now => format!(
                    "{} forwards for {} ms more",
                    m.from,
                    m.forward_until_unix_ms - now
                ),
                MigrationPhase::Released => "done".into(),
                MigrationPhase::Aborted => {
                    format!("aborted {}", after(m.created_unix_ms, m.updated_unix_ms))
                }
                MigrationPhase::Prepared | MigrationPhase::Frozen => {
                    format!("in progress since {}", ago(now, m.created_unix_ms))
                }
            };
            vec![
                m.id.clone(),
                m.container.to_string(),
                format!("{} → {}", m.from, m.to),
                m.phase.to_string(),
                ago(now, m.created_unix_ms),
                after(m.created_unix_ms, m.frozen_unix_ms),
                after(m.created_unix_ms, m.released_unix_ms),
                note,
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CONTAINER",
            "FROM → TO",
            "PHASE",
            "CREATED",
            "FROZEN",
            "RELEASED",
            "NOTE",
        ],
        rows,
    )
}

/// "never", "3s ago", "5m ago", "2h ago".
fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..120 => format!("{s}s ago"),
        120..7200 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

/// Left-aligned columns separated by two spaces.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    for r in &rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["IP", "HOST"],
            vec![
                vec!["10.244.1.5".into(), "a1".into()],
                vec!["10.244.10.50".into(), "b1".into()],
            ],
        );
        assert_eq!(t, "IP            HOST\n10.244.1.5    a1\n10.244.10.50  b1");
    }

    #[test]
    fn migration_exit_codes_and_lost_answers() {
        let http = |code: &str| -> CliError {
            ApiError::Http {
                status: 504,
                code: Some(code.into()),
                message: "m".into(),
                migration: None,
            }
            .into()
        };
        assert_eq!(http("rolled_back").exit_code(), 3);
        assert_eq!(http("needs_attention").exit_code(), 4);
        assert_eq!(http("bad_phase").exit_code(), 1);
        let lost = step_error(ApiError::Timeout {
            addr: "127.0.0.1:1".parse().unwrap(),
            what: "POST /v1/migrations/m1/freeze".into(),
            timeout: Duration::from_secs(1),
        });
        assert_eq!(
            (lost.code.as_str(), lost.exit_code()),
            ("needs_attention", 4)
        );
        let refused = step_error(ApiError::Connect {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(
            (refused.code.as_str(), refused.exit_code()),
            ("unreachable", 1)
        );
    }

    #[test]
    fn migration_tables() {
        assert_eq!(after(1000, 0), "-");
        assert_eq!(after(1000, 1350), "+350ms");
        assert_eq!(after(1000, 2500), "+1.5s");
        assert_eq!(after(0, 600_000), "+10m");
        let m = Migration {
            id: "m1".into(),
            container: "10.244.1.5".parse().unwrap(),
            from: "a1".into(),
            to: "b1".into(),
            phase: MigrationPhase::Released,
            created_unix_ms: 10_000,
            updated_unix_ms: 11_000,
            frozen_unix_ms: 10_200,
            released_unix_ms: 11_000,
            forward_until_unix_ms: 13_000,
            switch_pending: false,
            run: false,
        };
        let t = migration_table(&[m], 12_000);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("ID  CONTAINER   FROM → TO  PHASE"),
            "{t}"
        );
        assert!(
            lines[1].contains(
                "a1 → b1    released  2s ago   +200ms  +1.0s     a1 forwards for 1000 ms more"
            ),
            "{t}"
        );
    }

    #[test]
    fn ages() {
        assert_eq!(ago(10_000, 0), "never");
        assert_eq!(ago(10_000, 7_000), "3s ago");
        assert_eq!(ago(1_000_000, 1), "16m ago");
        assert_eq!(ago(10_000_000, 1), "2h ago");
    }

    #[test]
    fn api_errors_map_to_codes() {
        let e: CliError = ApiError::Http {
            status: 409,
            code: Some("duplicate_endpoint".into()),
            message: "m".into(),
            migration: None,
        }
        .into();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.code, "duplicate_endpoint");
        assert_eq!(e.message, "m");
        assert_eq!(e.to_string(), "m (duplicate_endpoint, HTTP 409)");
        let e: CliError = ApiError::Connect {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }
        .into();
        assert_eq!(e.code, "unreachable");
        assert!(e.message.starts_with("connecting to gateway 127.0.0.1:1"));
    }
}
