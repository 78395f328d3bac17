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
use lapin::{Channel, Connection};
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
    let mut cfg = cfg.clone();
    cfg.url.first_mut().set_username(user).unwrap();
    let password = std::fs::read_to_string(password_file).unwrap();
    let mut brokers = cfg.brokers(Some(&Secret::new(password.trim_end())));
    brokers.connect("provision-test", None).await.unwrap().0
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

/// Publishes `body` to `exchange` with a confirm; the error if the broker refuses it.
async fn publish(conn: &Connection, exchange: &str, key: &str, body: &[u8]) -> Result<(), String> {
    let ch = amqp::confirm_channel(conn)
        .await
        .map_err(|e| e.to_string())?;
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            amqp::reading_properties(&uuid::Uuid::now_v7().to_string()),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    match confirm.is_ack() {
        true => Ok(()),
        false => Err(format!("{confirm:?}")),
    }
}

fn refused(result: Result<impl std::fmt::Debug, impl std::fmt::Display>) -> bool {
    match result {
        Ok(v) => panic!("allowed: {v:?}"),
        Err(e) => e.to_string().contains("ACCESS_REFUSED"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_daemon_gets_only_what_it_uses_and_a_provisioning_step_owns_the_topology() {
    let names = Names::new("provision");
    names.create_schema().await;
    let dir = std::env::temp_dir().join(unique_name("provision"));
    let user = |role: &str| format!("{}-{role}", names.queue);
    let roles = ["producer", "consumer", "topology", "replay"];
    let _users = Users(roles.iter().map(|r| user(r)).collect());
    let file = |role: &str| dir.join(role);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(file("producer"), "given-password\n").unwrap();
    let specs: Vec<String> = roles
        .iter()
        .map(|r| format!("{r}:{}:{}", user(r), file(r).display()))
        .collect();

    // Missing passwords are generated; a second run changes nothing and still succeeds.
    let first = provision(&names, &specs);
    assert!(
        first.contains(&format!("generated a password for {}", user("consumer"))),
        "{first}"
    );
    let generated = std::fs::read_to_string(file("consumer")).unwrap();
    assert!(generated.len() >= 24, "{generated:?}");
    let second = provision(&names, &specs);
    assert!(!second.contains("generated"), "{second}");
    assert_eq!(
        std::fs::read_to_string(file("consumer")).unwrap(),
        generated
    );

    let mut cfg = names.consumer_config();
    cfg.amqp.declare = false;
    let amqp_cfg = cfg.amqp.clone();
    let as_role = |role: &str| {
        let mut c = cfg.clone();
        c.amqp.url.first_mut().set_username(&user(role)).unwrap();
        c.amqp.password_file = Some(file(role));
        c
    };

    // Nothing declared yet: a daemon's passive check fails with NOT_FOUND, a refusal it waits out.
    let producer = connect_as(&amqp_cfg, &user("producer"), &file("producer")).await;
    let ch = producer.create_channel().await.unwrap();
    let err = amqp::declare_topology(&ch, &amqp_cfg, false)
        .await
        .unwrap_err();
    assert!(
        err.is_refusal() && err.to_string().contains("checked only"),
        "{err}"
    );

    // The daemons' users cannot declare (configure) even our own names.
    let ch = producer.create_channel().await.unwrap();
    let declaring = AmqpConfig {
        declare: true,
        ..amqp_cfg.clone()
    };
    assert!(refused(
        amqp::declare_topology(&ch, &declaring, false).await
    ));
    let consumer = connect_as(&amqp_cfg, &user("consumer"), &file("consumer")).await;
    let ch = consumer.create_channel().await.unwrap();
    assert!(refused(amqp::declare_topology(&ch, &declaring, true).await));

    // `consumer declare-topology`, as the topology user, declares everything.
    let topology = as_role("topology");
    let out = Command::new(env!("CARGO_BIN_EXE_consumer"))
        .arg("declare-topology")
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(names.consumer_env())
        .env("CONSUMER_AMQP__URL", topology.amqp.url.first().as_str())
        .env("CONSUMER_AMQP__PASSWORD_FILE", file("topology"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ch = consumer.create_channel().await.unwrap();
    amqp::declare_topology(&ch, &amqp_cfg, true).await.unwrap();

    // The producer publishes, and may not consume, nor touch another name.
    publish(
        &producer,
        &names.exchange,
        &names.routing_key,
        &old_reading("S-1", 1.0),
    )
    .await
    .unwrap();
    let get = producer.create_channel().await.unwrap();
    assert!(refused(
        get.basic_get(
            names.queue.as_str().into(),
            BasicGetOptions { no_ack: false }
        )
        .await
    ));
    assert!(refused_other_queue(&producer).await);

    // The consumer consumes, may not publish readings, and may dead-letter.
    let ch = consumer.create_channel().await.unwrap();
    let msg = ch
        .basic_get(
            names.queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap();
    assert!(msg.is_some());
    assert!(refused(
        publish(&consumer, &names.exchange, &names.routing_key, b"{}").await
    ));
    publish(&consumer, &names.dead_letter_exchange, "", b"dead")
        .await
        .unwrap();
    assert!(refused_other_queue(&consumer).await);

    // The replay user reads the dead letters and publishes readings; it cannot declare.
    let replay = connect_as(&amqp_cfg, &user("replay"), &file("replay")).await;
    let ch = replay.create_channel().await.unwrap();
    let dead = ch
        .basic_get(
            names.dead_letter_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap();
    assert_eq!(
        dead.map(|m| m.delivery.data.clone()),
        Some(b"dead".to_vec())
    );
    publish(
        &replay,
        &names.exchange,
        &names.routing_key,
        &old_reading("S-2", 2.0),
    )
    .await
    .unwrap();
    assert!(refused_other_queue(&replay).await);

    // The whole pipeline runs on these users alone: the consumer stores a reading and
    // dead-letters a malformed message with its reason.
    publish(&producer, &names.exchange, &names.routing_key, b"not json")
        .await
        .unwrap();
    let running = start_consumer(as_role("consumer"));
    names.wait_rows(1, std::time::Duration::from_secs(30)).await;
    let admin = Client::connect().await;
    wait_until(
        std::time::Duration::from_secs(30),
        "the dead letter",
        || async { admin.ready(&names.dead_letter_queue).await == 1 },
    )
    .await;
    let dead = admin.drain(&names.dead_letter_queue).await;
    assert_eq!(dead[0].1, "malformed_json", "{dead:?}");
    stop_consumer(running).await;

    std::fs::remove_dir_all(&dir).unwrap();
}
