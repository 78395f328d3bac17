//! # sistema-mensajes
//!
//! Weather readings from RabbitMQ into PostgreSQL, each stored exactly once.
//!
//! # Layout
//! * `config`: both daemons' configuration (defaults, TOML file, environment) and its validation.
//! * `secret`: passwords from files or systemd credentials, redacted when printed.
//! * `reading`: the JSON wire format and the validation of one message.
//! * `station`: the producer's simulated stations.
//! * `silent_stations`: the stations the consumer has heard from, and which fell silent.
//! * `amqp`: connecting to RabbitMQ, the topology both daemons declare, dead-letter properties.
//! * `broker`: the brokers of `amqp.url` and the one reconnect loop both daemons run on them.
//! * `db`: PostgreSQL: connect, migrate, insert batches idempotently.
//! * `partition`: daily partitions of `weather_logs`: the online conversion, retention.
//! * `batch`: a pure batcher (size or age).
//! * `consumer`: reader, writer, dead-lettering and settlement of the consumer daemon.
//! * `producer`: the producer daemon, with publisher confirms and retries.
//! * `retry`: capped exponential backoff that gives way to shutdown.
//! * `health`, `systemd`: what the daemon is doing, reported to systemd (READY, STATUS, watchdog).
//! * `metrics`, `http`: Prometheus metrics and the `/metrics` listener.
//! * `daemon`, `telemetry`: what both binaries do around their pipeline, and logging.

pub mod amqp;
pub mod batch;
pub mod broker;
pub mod config;
pub mod consumer;
pub mod daemon;
pub mod db;
pub mod health;
pub mod http;
pub mod metrics;
pub mod partition;
pub mod process;
pub mod producer;
pub mod reading;
pub mod retry;
pub mod secret;
pub mod silent_stations;
pub mod station;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod web;
