use clap::Parser;
use command_dispatcher::cli::{Cli, CliCommand};
use command_dispatcher::run;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr; stdout carries only what a command prints for scripts.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("DISPATCHER_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let shutdown = CancellationToken::new();
    run::cancel_on_signal(shutdown.clone());
    let result = match cli.command {
        CliCommand::Serve(args) => run::serve(args, shutdown).await,
        CliCommand::Agent(args) => run::agent(args, shutdown).await,
        CliCommand::Token(args) => run::token(args).map(|token| println!("{token}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dispatcher: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
