use clap::Parser as _;
use ferry_agent::{
    cli::{Cli, LogFormat},
    config::AgentConfig,
};
use tracing::Instrument as _;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = AgentConfig::load(&cli.config)?;
    init_tracing(cli.log_format);
    if cli.check {
        println!("{}: ok", cli.config.display());
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let span = tracing::info_span!("agent", host = %cfg.host);
    if cli.teardown {
        span.in_scope(|| tracing::info!("tearing down"));
        return rt.block_on(ferry_agent::agent::teardown(cfg).instrument(span));
    }
    span.in_scope(|| tracing::info!(vtep = %cfg.vtep, overlay_ip = %cfg.overlay_ip, "starting"));
    rt.block_on(ferry_agent::agent::run(cfg).instrument(span))
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
