use clap::Parser;
use command_dispatcher::cli::{Cli, CliCommand};
use command_dispatcher::{logging, run};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr; stdout carries only what a command prints for scripts.
    logging::init();

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
