//! One-shot commands of a provisioning step: `consumer migrate`, `consumer maintain`,
//! `consumer declare-topology` and `consumer hash-password` (docs/security.md, "Least
//! privilege"). Each exits 0 when done, 78 for a configuration error, 75 (`EX_TEMPFAIL`) when the
//! server is unreachable, so that a unit may retry it, and 1 for anything else.

use std::io::Read;

use crate::amqp::{self, AmqpError};
use crate::config::{AmqpConfig, ConfigError, PostgresConfig, EXIT_CONFIG};
use crate::db::{self, DbError, Migrated};

/// sysexits `EX_TEMPFAIL`: try again later.
pub const EXIT_UNAVAILABLE: u8 = 75;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

impl AdminError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AdminError::Config(_) | AdminError::Invalid(_) => EXIT_CONFIG,
            AdminError::Db(DbError::Config(_)) => EXIT_CONFIG,
            AdminError::Db(e) if e.is_outage() => EXIT_UNAVAILABLE,
            AdminError::Amqp(e) if !e.is_refusal() => EXIT_UNAVAILABLE,
            AdminError::Db(_) | AdminError::Amqp(_) => 1,
        }
    }
}

/// `consumer migrate`: see [`db::migrate_as_owner`]; with `maintain`, then [`maintain`]'s work.
pub async fn migrate(cfg: &PostgresConfig, maintain: bool) -> Result<Migrated, AdminError> {
    let (owner, password) = cfg.owner()?;
    let password = crate::secret::loaded("postgres owner", password);
    if cfg.owner_url.is_some() && cfg.role().is_none() {
        return Err(AdminError::Invalid(
            "postgres.url names no user, so `consumer migrate` cannot know which role to grant"
                .into(),
        ));
    }
    Ok(db::migrate_as_owner(cfg, &owner, password.as_ref(), maintain).await?)
}

/// `consumer maintain`: see [`db::maintain_as_owner`].
pub async fn maintain(cfg: &PostgresConfig) -> Result<crate::partition::Maintained, AdminError> {
    let (owner, password) = cfg.owner()?;
    let password = crate::secret::loaded("postgres owner", password);
    Ok(db::maintain_as_owner(cfg, &owner, password.as_ref()).await?)
}

/// `consumer declare-topology`: declares the exchange, the queue, their binding, and the
/// dead-letter exchange and queue (whatever `amqp.declare` says), with this config's user, which
/// needs `configure` on them (the provisioning script's `topology` role).
pub async fn declare_topology(cfg: &AmqpConfig) -> Result<(), AdminError> {
    let cfg = AmqpConfig {
        declare: true,
        ..cfg.clone()
    };
    let password = crate::secret::loaded("amqp", cfg.password()?);
    let (conn, _) = cfg
        .brokers(password.as_ref())
        .connect("sistema-mensajes declare-topology", None)
        .await?;
    let declared = amqp::bounded(async {
        let ch = conn.create_channel().await?;
        amqp::declare_topology(&ch, &cfg, true).await
    })
    .await;
    amqp::close(&conn, "topology declared").await;
    Ok(declared?)
}

/// `consumer hash-password`: the SCRAM-SHA-256 verifier of the password on `input` (one trailing
/// newline stripped, as password files are read), for `ALTER ROLE … PASSWORD '<verifier>'`: the
/// password itself then never goes through SQL, which PostgreSQL may log.
pub fn hash_password(input: &mut impl Read) -> Result<String, AdminError> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .map_err(|e| AdminError::Invalid(format!("cannot read the password on stdin: {e}")))?;
    let password = crate::secret::Secret::new(text);
    let p = password.expose();
    let p = p.strip_suffix('\n').unwrap_or(p);
    let p = p.strip_suffix('\r').unwrap_or(p);
    if p.is_empty() {
        return Err(AdminError::Invalid("the password on stdin is empty".into()));
    }
    Ok(postgres_protocol::password::scram_sha_256(p.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_password_gives_a_verifier_not_the_password() {
        let v = hash_password(&mut "hunter2\n".as_bytes()).unwrap();
        assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{v}");
        assert!(!v.contains("hunter2"));
        assert!(hash_password(&mut "\n".as_bytes()).is_err());
    }
}
