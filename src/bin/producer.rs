//! `producer`: publishes simulated weather readings to RabbitMQ. All logic is in the library.

use std::process::ExitCode;

use clap::Parser;
use sistema_mensajes::config::ProducerConfig;
use sistema_mensajes::daemon::{self, CommonArgs, Service, EXIT_FAILURE};
use sistema_mensajes::metrics::ProducerMetrics;
use sistema_mensajes::producer::{self, Deps, Mode};
use tracing::{error, info};

/// Publishes simulated weather readings to RabbitMQ with publisher confirms.
#[derive(Parser)]
#[command(name = "producer", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Publish this many readings, then exit: 0 only when the broker confirmed all of them.
    #[arg(long, value_name = "N", conflicts_with = "send")]
    count: Option<u64>,
    /// Publish one hand-written message exactly as given (JSON text, or `-` for stdin), then exit.
    #[arg(long, value_name = "JSON")]
    send: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mode = match Mode::from_args(cli.send.as_deref(), cli.count, std::io::stdin()) {
        Ok(mode) => mode,
        Err(e) => {
            eprintln!("producer: cannot read stdin: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let run = || -> Result<(), ExitCode> {
        let cfg: ProducerConfig = daemon::setup(&cli.common, "producer")?;
        let deps = Deps::default();
        let service = Service::new(
            &deps,
            // A one-shot send serves no metrics, so it runs beside a producer daemon.
            (!matches!(mode, Mode::Send(_))).then_some(cfg.metrics.listen),
            &cfg.metrics,
            cfg.shutdown_timeout,
            ProducerMetrics::render,
            producer::status_line,
        )?;
        let summary = daemon::runtime()?.block_on(daemon::serve(service, |token| {
            producer::run(cfg, mode, deps, token)
        }))?;
        info!(
            message = "Stopped.",
            confirmed = summary.confirmed,
            unconfirmed = summary.unconfirmed
        );
        if summary.unconfirmed > 0 {
            error!(
                message = "Not every reading was confirmed.",
                confirmed = summary.confirmed,
                unconfirmed = summary.unconfirmed
            );
            return Err(ExitCode::from(EXIT_FAILURE));
        }
        Ok(())
    };
    run().err().unwrap_or(ExitCode::SUCCESS)
}
