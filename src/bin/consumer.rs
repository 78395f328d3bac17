//! `consumer`: stores weather readings from RabbitMQ in PostgreSQL. All logic is in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use sistema_mensajes::config::ConsumerConfig;
use sistema_mensajes::consumer::{self, replay, Deps};
use sistema_mensajes::daemon::{self, CommonArgs, Service};

/// Reads weather readings from RabbitMQ, validates them and stores each exactly once in
/// PostgreSQL. Invalid messages go to the dead-letter queue with their reason.
#[derive(Parser)]
#[command(name = "consumer", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Move the messages of the dead-letter queue back to the exchange they came from, once their
    /// cause is mended; each with a confirm, then acknowledged. Prints how many, then exits.
    ReplayDeadLetters {
        /// Only those rejected for this reason (`x-rejection-reason`, e.g. database_rejected).
        #[arg(long, value_name = "REASON")]
        reason: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = || -> Result<(), ExitCode> {
        let daemon = cli.command.is_none();
        let cfg: ConsumerConfig = daemon::setup_checking(&cli.common, "consumer", daemon)?;
        if let Some(Command::ReplayDeadLetters { reason }) = &cli.command {
            let done = daemon::runtime()?.block_on(replay::run(&cfg.amqp, reason.as_deref()));
            return daemon::report(done.and_then(replay::Replayed::finished));
        }
        let deps = Deps::default();
        let (metrics, health) = (deps.metrics.clone(), deps.health.clone());
        let service = Service {
            listen: Some(cfg.metrics.listen),
            render: Arc::new({
                let (metrics, health) = (metrics.clone(), health.clone());
                move || metrics.render(health.phase())
            }),
            status: Arc::new(move || consumer::status_line(&metrics, &health)),
            health: deps.health.clone(),
            shutdown_timeout: cfg.shutdown_timeout,
        };
        daemon::runtime()?.block_on(daemon::serve(service, |token| {
            consumer::run(cfg, deps, token)
        }))
    };
    run().err().unwrap_or(ExitCode::SUCCESS)
}
