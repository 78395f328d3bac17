//! `consumer`: stores weather readings from RabbitMQ in PostgreSQL. All logic is in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use sistema_mensajes::config::ConsumerConfig;
use sistema_mensajes::consumer::{self, Deps};
use sistema_mensajes::daemon::{self, CommonArgs};

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
        let metrics = deps.metrics.clone();
        let render = Arc::new(move || metrics.render());
        let (listen, timeout) = (Some(cfg.metrics.listen), cfg.shutdown_timeout);
        daemon::runtime()?.block_on(daemon::serve(listen, render, timeout, |token| {
            consumer::run(cfg, deps, token)
        }))
    };
    run().err().unwrap_or(ExitCode::SUCCESS)
}
