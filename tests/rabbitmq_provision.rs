//! `nixos/rabbitmq-provision.sh` (the NixOS module runs it at boot) against the real broker: it
//! creates one user per daemon whose permissions let the daemon do its work on our names and
//! nothing else. Users, exchanges and queues are unique per run and removed at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use sistema_mensajes::amqp;
use sistema_mensajes::config::AmqpConfig;
use sistema_mensajes::secret::Secret;

/// Deletes the broker users when the test ends, however it ends.
struct Users(Vec<String>);

impl Drop for Users {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = Command::new("rabbitmqctl")
                .args(["--quiet", "delete_user", u])
                .output();
        }
    }
}

fn provision(names: &Names, specs: &[String]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos/rabbitmq-provision.sh");
    let out = Command::new(script)
        .args([
            "--generate",
            "--exchange",
            &names.exchange,
            "--queue",
            &names.queue,
        ])
        .args(["--dead-letter-exchange", &names.dead_letter_exchange])
        .args(["--dead-letter-queue", &names.dead_letter_queue])
        .args(specs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn connect_as(cfg: &AmqpConfig, user: &str, password_file: &Path) -> Connection {
    let mut url = cfg.url.clone();
    url.set_username(user).unwrap();
    let password = std::fs::read_to_string(password_file).unwrap();
    let uri =
        AmqpConfig { url, ..cfg.clone() }.connect_uri(Some(&Secret::new(password.trim_end())));
    amqp::connect(&uri, "provision-test", None).await.unwrap()
}

/// Declaring a queue outside our names must be refused (ACCESS_REFUSED closes the channel).
async fn refused_other_queue(conn: &Connection) -> bool {
    let ch: Channel = conn.create_channel().await.unwrap();
    ch.queue_declare(
        unique_name("not-ours").as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .is_err_and(|e| e.to_string().contains("ACCESS_REFUSED"))
}

#[tokio::test]
async fn each_daemon_gets_a_user_limited_to_the_pipeline_names() {
    let names = Names::new("provision");
    let dir = std::env::temp_dir().join(unique_name("provision"));
    let producer = format!("{}-producer", names.queue);
    let consumer = format!("{}-consumer", names.queue);
    let _users = Users(vec![producer.clone(), consumer.clone()]);
    let (pfile, cfile) = (dir.join("producer"), dir.join("consumer"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&pfile, "given-password\n").unwrap();
    let specs = [
        format!("producer:{producer}:{}", pfile.display()),
        format!("consumer:{consumer}:{}", cfile.display()),
    ];

    // The consumer's password is generated; a second run changes nothing and still succeeds.
    let first = provision(&names, &specs);
    assert!(
        first.contains(&format!("generated a password for {consumer}")),
        "{first}"
    );
    let generated = std::fs::read_to_string(&cfile).unwrap();
    assert!(generated.len() >= 24, "{generated:?}");
    let second = provision(&names, &specs);
    assert!(!second.contains("generated"), "{second}");
    assert_eq!(std::fs::read_to_string(&cfile).unwrap(), generated);

    let cfg = names.consumer_config().amqp;

    // The producer declares and binds its exchange and queue and publishes, but may not consume
    // the queue nor touch any other name.
    let conn = connect_as(&cfg, &producer, &pfile).await;
    let ch = amqp::confirm_channel(&conn).await.unwrap();
    amqp::declare_topology(&ch, &cfg, false).await.unwrap();
    let confirm = ch
        .basic_publish(
            cfg.exchange.as_str().into(),
            cfg.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let get = conn.create_channel().await.unwrap();
    let err = get
        .basic_get(cfg.queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ACCESS_REFUSED"), "{err}");
    assert!(refused_other_queue(&conn).await);

    // The consumer declares everything, dead-letter side included, and reads the queue.
    let conn = connect_as(&cfg, &consumer, &cfile).await;
    let ch = conn.create_channel().await.unwrap();
    amqp::declare_topology(&ch, &cfg, true).await.unwrap();
    let msg = ch
        .basic_get(cfg.queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert_eq!(msg.map(|m| m.delivery.data.clone()), Some(b"{}".to_vec()));
    assert!(refused_other_queue(&conn).await);

    std::fs::remove_dir_all(&dir).unwrap();
}
