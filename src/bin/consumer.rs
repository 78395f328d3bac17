//! `consumer`: stores weather readings from RabbitMQ in PostgreSQL. All logic is in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sistema_mensajes::config::ConsumerConfig;
use sistema_mensajes::consumer::admin::{self, AdminError};
use sistema_mensajes::consumer::{self, replay, Deps};
use sistema_mensajes::daemon::{self, CommonArgs, Service};
use sistema_mensajes::metrics::ConsumerMetrics;

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
    /// Move the messages of the dead-letter queue back to amqp.exchange (amqp.routing_key), once their
    /// cause is mended; each with a confirm, then acknowledged. Prints how many, then exits.
    ReplayDeadLetters {
        /// Only those rejected for this reason (`x-rejection-reason`, e.g. database_rejected).
        #[arg(long, value_name = "REASON")]
        reason: Option<String>,
    },
    /// Apply the schema migrations as the owner role (`postgres.owner_url`, else `postgres.url`)
    /// and grant the consumer's role (the user of `postgres.url`) only what it needs: USAGE on the
    /// schema, INSERT on weather_logs, SELECT on schema_migrations, EXECUTE on
    /// weather_logs_conflicts. Then does what `maintain` does, unless --schema-only. Exits 0 when
    /// done, 75 if PostgreSQL is unreachable, 78 for a config error.
    Migrate {
        /// Only the migrations and grants (before the consumer starts), and the conversion of an
        /// empty weather_logs; that of a table with rows, which may take long, is left to
        /// `maintain`.
        #[arg(long)]
        schema_only: bool,
    },
    /// As the owner role: convert weather_logs to daily partitions if it is not yet (while the
    /// consumer goes on writing), create the partitions for the days ahead and drop those older
    /// than postgres.retention. For a timer (consumer-maintain.timer). Exits 0, 75 or 78.
    Maintain,
    /// Declare the exchange, queue, binding and dead-letter exchange and queue (needs RabbitMQ's
    /// configure permission; for daemons run with `amqp.declare = false`). Exits 0, 75 or 78.
    DeclareTopology,
    /// Read a password on stdin and print its SCRAM-SHA-256 verifier, for
    /// `ALTER ROLE … PASSWORD '<verifier>'` without the password in SQL.
    HashPassword,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = || -> Result<(), ExitCode> {
        let daemon = cli.command.is_none();
        let cfg: ConsumerConfig = daemon::setup_checking(&cli.common, "consumer", daemon)?;
        let admin = |result: Result<String, AdminError>| match result {
            Ok(done) => {
                println!("{done}");
                Err(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("consumer: {e}");
                Err(ExitCode::from(e.exit_code()))
            }
        };
        match &cli.command {
            None => {}
            Some(Command::ReplayDeadLetters { reason }) => {
                let done = daemon::runtime()?.block_on(replay::run(&cfg.amqp, reason.as_deref()));
                return daemon::report(done.and_then(replay::Replayed::finished));
            }
            Some(Command::Migrate { schema_only }) => {
                let done = daemon::runtime()?.block_on(admin::migrate(&cfg.postgres, !schema_only));
                return admin(done.map(|m| {
                    let out = match &m.writer {
                        Some(role) => {
                            format!("schema `{}` migrated; role `{role}` may insert", m.schema)
                        }
                        None => format!(
                            "schema `{}` migrated (the owner is the consumer's role)",
                            m.schema
                        ),
                    };
                    out + &m.maintained.map(|m| format!("\n{m}")).unwrap_or_default()
                }));
            }
            Some(Command::Maintain) => {
                let done = daemon::runtime()?.block_on(admin::maintain(&cfg.postgres));
                return admin(done.map(|m| m.to_string()));
            }
            Some(Command::DeclareTopology) => {
                let done = daemon::runtime()?.block_on(admin::declare_topology(&cfg.amqp));
                return admin(done.map(|()| "topology declared".to_owned()));
            }
            Some(Command::HashPassword) => {
                return admin(admin::hash_password(&mut std::io::stdin().lock()));
            }
        }
        let deps = Deps::default();
        let service = Service::new(
            &deps,
            Some(cfg.metrics.listen),
            &cfg.metrics,
            cfg.shutdown_timeout,
            ConsumerMetrics::render,
            consumer::status_line,
        )?;
        daemon::runtime()?.block_on(daemon::serve(service, |token| {
            consumer::run(cfg, deps, token)
        }))
    };
    run().err().unwrap_or(ExitCode::SUCCESS)
}
