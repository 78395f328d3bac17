//! `consumer`: stores weather readings from RabbitMQ in PostgreSQL. All logic is in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use sistema_mensajes::config::ConsumerConfig;
use sistema_mensajes::consumer::{self, Deps};
use sistema_mensajes::daemon::{self, CommonArgs, Service};

/// Reads weather readings from RabbitMQ, validates them and stores each exactly once in
/// PostgreSQL. Invalid messages go to the dead-letter queue with their reason.
#[derive(Parser)]
#[command(name = "consumer", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = || -> Result<(), ExitCode> {
        let cfg: ConsumerConfig = daemon::setup(&cli.common, "consumer")?;
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
