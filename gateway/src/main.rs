use std::process::ExitCode;

use clap::Parser as _;
use ferry_gateway::{
    cli::{Cli, Command},
    server,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: starting runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Gateway { listen, state_dir } => server::serve(listen, &state_dir).await,
            Command::Health { gateway } => {
                let h: server::Health = server::get_json(gateway, "/v1/health").await?;
                if cli.json {
                    println!("{}", serde_json::to_string(&h)?);
                } else {
                    println!(
                        "gateway {gateway}: {} (api {}, ferry {})",
                        h.status, h.api, h.version
                    );
                }
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            } else {
                eprintln!("ferry: {e:#}");
            }
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
