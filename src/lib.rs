//! # sistema-mensajes
//!
//! Weather readings from RabbitMQ into PostgreSQL, each stored exactly once.
//!
//! # Layout
//! * `config`: both daemons' configuration (defaults, TOML file, environment) and its validation.
//! * `secret`: passwords from files or systemd credentials, redacted when printed.
//! * `reading`: the JSON wire format and the validation of one message.

pub mod amqp;
pub mod config;
pub mod consumer;
pub mod daemon;
pub mod db;
pub mod health;
pub mod http;
pub mod metrics;
pub mod process;
pub mod producer;
pub mod reading;
pub mod retry;
pub mod secret;
pub mod station;
pub mod systemd;
pub mod telemetry;
