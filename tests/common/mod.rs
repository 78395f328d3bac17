//! Shared by the integration tests: endpoints from the environment, unique names per test,
//! guards that remove what a test created, a deadline-bound `wait_until`, and a TCP proxy that can
//! cut a connection for real.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rand::distr::{Alphanumeric, SampleString};
use sistema_mensajes::config::{AmqpName, ConsumerConfig, Identifier, ProducerConfig, RetryConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_postgres::NoTls;
use url::Url;

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn pg_url() -> String {
    std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The tests need the real servers; on a machine where one does not answer, every test that
/// needs it fails at once with this one line (what to start, and how), instead of a connection
/// error or a timeout. Checked once per test binary.
pub fn require_servers() {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = CHECKED.get_or_init(|| {
        for (what, url, var) in [
            ("RabbitMQ", amqp_url(), "TEST_AMQP_URL"),
            ("PostgreSQL", pg_url(), "TEST_PG_URL"),
        ] {
            let parsed = Url::parse(&url).map_err(|e| format!("{var}: {e}"))?;
            let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
            let port = parsed.port_or_known_default().unwrap_or(match what {
                "RabbitMQ" => 5672,
                _ => 5432,
            });
            let answers = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| {
                    std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
                });
            if !answers {
                return Err(format!(
                    "{what} does not answer on {host}:{port}: run `scripts/services up` (starts \
                     the local RabbitMQ and PostgreSQL, installing them if needed), or set {var}"
                ));
            }
        }
        Ok(())
    });
    if let Err(line) = result {
        panic!("{line}");
    }
}

/// `test-<what>-<10 random characters>`, lowercase.
pub fn unique_name(what: &str) -> String {
    let r = Alphanumeric
        .sample_string(&mut rand::rng(), 10)
        .to_lowercase();
    format!("test-{what}-{r}")
}

/// Polls `check` with doubling delays until it returns true; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut delay = Duration::from_millis(10);
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// Waits until a consumer or producer started in-process is consuming (or publishing).
pub async fn wait_running(health: &sistema_mensajes::health::Health) {
    wait_until(
        Duration::from_secs(30),
        "the daemon to reach Running",
        || async { health.phase() == sistema_mensajes::health::Phase::Running },
    )
    .await;
}

/// Runs async cleanup from `Drop`, on a runtime of its own.
pub fn cleanup(fut: impl Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(fut);
        }
    })
    .join();
}

pub async fn pg_client(url: &str) -> tokio_postgres::Client {
    require_servers();
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

/// Names of everything one test creates, dropped at the end (schema with its tables; queues and
/// exchanges).
pub struct Names {
    pub schema: String,
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
}

impl Names {
    pub fn new(what: &str) -> Self {
        require_servers();
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let filter: tracing_subscriber::filter::Targets = std::env::var("TEST_LOG")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| "warn".parse().unwrap());
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(filter),
            )
            .try_init();
        let base = unique_name(what);
        Self {
            schema: base.replace('-', "_"),
            exchange: format!("{base}-x"),
            queue: format!("{base}-q"),
            routing_key: format!("{base}-key"),
            dead_letter_exchange: format!("{base}-dlx"),
            dead_letter_queue: format!("{base}-dlq"),
        }
    }

    /// Creates the schema (empty: the consumer applies the migrations itself).
    pub async fn create_schema(&self) {
        pg_client(&pg_url())
            .await
            .batch_execute(&format!("CREATE SCHEMA {}", self.schema))
            .await
            .unwrap();
    }

    /// The schema, and the queues as the older system declared them; the broker client it used.
    pub async fn prepare(&self) -> Client {
        self.create_schema().await;
        let client = Client::connect().await;
        self.predeclare_like_the_old_system(&client.channel).await;
        client
    }

    pub fn consumer_config(&self) -> ConsumerConfig {
        self.consumer_config_via(&amqp_url(), &pg_url())
    }

    /// Config with our names; `amqp` and `pg` may point at a proxy.
    pub fn consumer_config_via(&self, amqp: &str, pg: &str) -> ConsumerConfig {
        let mut c = ConsumerConfig::default();
        self.apply(&mut c.amqp);
        c.amqp.url = Url::parse(amqp).unwrap().into();
        c.postgres.url = Url::parse(pg).unwrap();
        c.postgres.schema = Identifier::try_from(self.schema.clone()).unwrap();
        c.postgres.connect_timeout = Duration::from_secs(2);
        c.retry = fast_retry();
        c.metrics.listen = "127.0.0.1:0".parse().unwrap();
        c
    }

    pub fn producer_config_via(&self, amqp: &str) -> ProducerConfig {
        let mut c = ProducerConfig::default();
        self.apply(&mut c.amqp);
        c.amqp.url = Url::parse(amqp).unwrap().into();
        c.retry = fast_retry();
        c.simulation.rate = Some(0.0);
        c.metrics.listen = "127.0.0.1:0".parse().unwrap();
        c
    }

    fn apply(&self, a: &mut sistema_mensajes::config::AmqpConfig) {
        let name = |s: &str| AmqpName::try_from(s.to_owned()).unwrap();
        a.exchange = name(&self.exchange);
        a.queue = name(&self.queue);
        a.routing_key = name(&self.routing_key);
        a.dead_letter_exchange = name(&self.dead_letter_exchange);
        a.dead_letter_queue = name(&self.dead_letter_queue);
    }

    /// The environment that gives the binaries this config.
    pub fn consumer_env(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = [
            ("CONSUMER_AMQP__URL", amqp_url()),
            ("CONSUMER_AMQP__EXCHANGE", self.exchange.clone()),
            ("CONSUMER_AMQP__QUEUE", self.queue.clone()),
            ("CONSUMER_AMQP__ROUTING_KEY", self.routing_key.clone()),
            (
                "CONSUMER_AMQP__DEAD_LETTER_EXCHANGE",
                self.dead_letter_exchange.clone(),
            ),
            (
                "CONSUMER_AMQP__DEAD_LETTER_QUEUE",
                self.dead_letter_queue.clone(),
            ),
            ("CONSUMER_POSTGRES__URL", pg_url()),
            ("CONSUMER_POSTGRES__SCHEMA", self.schema.clone()),
            ("CONSUMER_METRICS__LISTEN", "127.0.0.1:0".into()),
            ("CONSUMER_RETRY__MIN_DELAY", "50ms".into()),
            ("CONSUMER_RETRY__MAX_DELAY", "500ms".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        v.push(("RUST_LOG".into(), "info,tokio_postgres=warn".into()));
        v
    }

    /// Declares the main queue the way the older system did: durable, no arguments, bound.
    pub async fn predeclare_like_the_old_system(&self, ch: &Channel) {
        ch.exchange_declare(
            self.exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        self.bind(ch).await;
    }

    /// Binds the queue to the exchange with the routing key.
    pub async fn bind(&self, ch: &Channel) {
        ch.queue_bind(
            self.queue.as_str().into(),
            self.exchange.as_str().into(),
            self.routing_key.as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }

    /// Removes that binding: readings published are then unroutable.
    pub async fn unbind(&self, ch: &Channel) {
        ch.queue_unbind(
            self.queue.as_str().into(),
            self.exchange.as_str().into(),
            self.routing_key.as_str().into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }

    /// Rows stored. Exactly-once is checked against the ids that were confirmed, in
    /// [`Self::assert_stored_exactly`], which compares the list of stored ids (an id stored twice,
    /// in two partitions, shows there).
    pub async fn rows(&self) -> i64 {
        let client = pg_client(&pg_url()).await;
        let sql = format!("SELECT count(*) FROM {}.weather_logs", self.schema);
        // The table exists from the consumer's start (migrations run before it reads): an error
        // here is a test bug or a broken schema, never "no rows yet".
        let row = client
            .query_one(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("cannot count rows in {}: {e}", self.schema));
        row.get(0)
    }

    /// Rows stored so far, 0 while the consumer has not created the table yet. Only for waiting
    /// on rows to appear: to check that nothing was stored, use the strict [`Self::rows`].
    pub async fn stored_so_far(&self) -> i64 {
        let client = pg_client(&pg_url()).await;
        let sql = format!("SELECT count(*) FROM {}.weather_logs", self.schema);
        match client.query_one(&sql, &[]).await {
            Ok(row) => row.get(0),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
            Err(e) => panic!("cannot count rows in {}: {e}", self.schema),
        }
    }

    /// Waits until `n` (at least one) rows are stored, then checks that no more came.
    pub async fn wait_rows(&self, n: u64, limit: Duration) {
        assert!(n > 0, "to check that nothing is stored, use rows()");
        wait_until(limit, &format!("{n} readings stored"), || async {
            self.stored_so_far().await >= n as i64
        })
        .await;
        assert_eq!(self.rows().await, n as i64, "more rows than readings");
    }

    /// Waits until as many rows as `ids` are stored, then checks they are exactly `ids`.
    pub async fn assert_stored_exactly(&self, mut ids: Vec<uuid::Uuid>, limit: Duration) {
        ids.sort();
        wait_until(limit, "every reading stored", || async {
            self.stored_so_far().await >= ids.len() as i64
        })
        .await;
        assert_eq!(self.stored_ids().await, ids, "each reading exactly once");
    }

    pub async fn stored_ids(&self) -> Vec<uuid::Uuid> {
        let client = pg_client(&pg_url()).await;
        let sql = format!(
            "SELECT message_id FROM {}.weather_logs ORDER BY message_id",
            self.schema
        );
        client
            .query(&sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        let queues = [self.queue.clone(), self.dead_letter_queue.clone()];
        let exchanges = [self.exchange.clone(), self.dead_letter_exchange.clone()];
        cleanup(async move {
            if let Ok((client, conn)) = tokio_postgres::connect(&pg_url(), NoTls).await {
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await;
            }
            if let Ok(conn) =
                Connection::connect(&amqp_url(), ConnectionProperties::default()).await
            {
                if let Ok(ch) = conn.create_channel().await {
                    for q in queues {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    for x in exchanges {
                        let _ = ch
                            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "".into()).await;
            }
        });
    }
}

pub fn fast_retry() -> RetryConfig {
    RetryConfig {
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
    }
}

/// A plain AMQP client, like the older system's scripts.
pub struct Client {
    pub conn: Connection,
    pub channel: Channel,
}

impl Client {
    pub async fn connect() -> Self {
        require_servers();
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        Self { conn, channel }
    }

    /// Publishes persistent messages and waits for every confirm.
    pub async fn publish_all(
        &self,
        exchange: &str,
        key: &str,
        bodies: &[(Vec<u8>, BasicProperties)],
    ) {
        let mut confirms = Vec::new();
        for (body, props) in bodies {
            let props = props.clone().with_delivery_mode(2);
            confirms.push(
                self.channel
                    .basic_publish(
                        exchange.into(),
                        key.into(),
                        BasicPublishOptions::default(),
                        body,
                        props,
                    )
                    .await
                    .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }

    /// Messages ready in `queue` (not counting unacknowledged ones).
    pub async fn ready(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let n = q
            .unwrap_or_else(|e| panic!("queue {queue} cannot be inspected: {e}"))
            .message_count();
        let _ = ch.close(200, "".into()).await;
        n
    }

    /// Takes every message in `queue` (acking them): (body, x-rejection-reason, x-rejection-detail).
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, String, String)> {
        let mut out = Vec::new();
        while let Some(msg) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let props = &msg.delivery.properties;
            let reason = sistema_mensajes::amqp::header_str(props, "x-rejection-reason")
                .unwrap_or("")
                .to_owned();
            let detail = sistema_mensajes::amqp::header_str(props, "x-rejection-detail")
                .unwrap_or("")
                .to_owned();
            out.push((msg.delivery.data.clone(), reason, detail));
        }
        out
    }
}

/// Unacknowledged messages of `queue`, asked of the broker itself.
pub fn unacked(queue: &str) -> Option<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next()? == queue).then(|| parts.next()?.parse().ok())?
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Connections stay open but nothing is forwarded: a hung peer.
    Paused,
    /// Connections opened before the `n`th are paused for good; newer ones flow.
    HangOlderThan(u64),
    /// Every connection is closed and new ones are refused.
    Cut,
}

impl Link {
    fn holds(self, conn: u64) -> bool {
        match self {
            Link::Paused => true,
            Link::HangOlderThan(n) => conn < n,
            Link::Up | Link::Cut => false,
        }
    }
}

/// A TCP proxy on 127.0.0.1 in front of `target` that can cut or pause the traffic for real.
pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Every connection attempt, those refused while cut included.
    tried: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Copies one direction, holding data back while paused; ends when cut or closed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    conn: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = link.wait_for(|l| *l == Link::Cut) => return,
        };
        if link
            .wait_for(|l| !l.holds(conn))
            .await
            .map(|l| *l == Link::Cut)
            .unwrap_or(true)
        {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, _) = watch::channel(Link::Up);
        let rx = link.subscribe();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = accepted.clone();
        let tried = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let attempts = tried.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if *rx.borrow() == Link::Cut {
                    drop(inbound);
                    continue;
                }
                let conn = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::join!(pump(ir, ow, rx.clone(), conn), pump(or, iw, rx, conn));
                });
            }
        });
        Self {
            addr,
            link,
            accepted,
            tried,
        }
    }

    /// Every connection open now goes silent for good (no RST, no answer), as behind a dead
    /// router; connections opened from now on work.
    pub fn hang_open_connections(&self) {
        let n = self.accepted.load(std::sync::atomic::Ordering::SeqCst);
        self.link.send_replace(Link::HangOlderThan(n));
    }

    /// Connection attempts so far, those refused while cut included.
    pub fn attempts(&self) -> u64 {
        self.tried.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn cut(&self) {
        self.link.send_replace(Link::Cut);
    }

    pub fn pause(&self) {
        self.link.send_replace(Link::Paused);
    }

    pub fn restore(&self) {
        self.link.send_replace(Link::Up);
    }

    /// `url` with its port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let mut u = Url::parse(url).unwrap();
        u.set_port(Some(self.addr.port())).unwrap();
        u.to_string()
    }
}

pub fn target_of(url: &str) -> SocketAddr {
    let u = Url::parse(url).unwrap();
    let host = u.host_str().unwrap();
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", u.port().unwrap()).parse().unwrap()
}

/// A valid reading in the older system's four-field form.
pub fn old_reading(station: &str, t: f64) -> Vec<u8> {
    format!(r#"{{"station_id": "{station}", "temperature": {t}, "humidity": 55.02, "pressure": 1012.33}}"#).into_bytes()
}

/// A valid reading with our id.
pub fn reading_with_id(id: uuid::Uuid) -> Vec<u8> {
    format!(r#"{{"station_id": "STATION-001", "temperature": 21.5, "humidity": 55.0, "pressure": 1012.0, "message_id": "{id}"}}"#).into_bytes()
}

pub fn props() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into())
}

/// Sends SIGTERM to a child process, as systemd does on stop.
pub fn sigterm(pid: Option<u32>) {
    let pid = pid.expect("child still running").to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
}

/// The producer confirmed all `n` readings and holds none back.
/// Publishes `n` simulated readings through the producer and checks that all were confirmed.
pub async fn produce_confirmed(names: &Names, n: u64) {
    produce_confirmed_via(names, &amqp_url(), n).await
}

/// [`produce_confirmed`] through the broker at `amqp`.
pub async fn produce_confirmed_via(names: &Names, amqp: &str, n: u64) {
    let summary = sistema_mensajes::producer::run(
        names.producer_config_via(amqp),
        sistema_mensajes::producer::Mode::Count(n),
        Default::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_all_confirmed(summary, n);
}

/// Publishes readings with fresh ids through a plain client; returns the ids.
pub async fn publish_readings(client: &Client, names: &Names, n: usize) -> Vec<uuid::Uuid> {
    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
    let msgs: Vec<_> = ids
        .iter()
        .map(|id| (reading_with_id(*id), props()))
        .collect();
    client
        .publish_all(&names.exchange, &names.routing_key, &msgs)
        .await;
    ids
}

pub fn assert_all_confirmed(summary: sistema_mensajes::producer::Summary, n: u64) {
    assert_eq!(
        summary,
        sistema_mensajes::producer::Summary {
            confirmed: n,
            unconfirmed: 0
        }
    );
}

/// A consumer running in-process: its deps, its token, and its task.
pub type Running = (
    sistema_mensajes::consumer::Deps,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
);

pub fn start_consumer(cfg: ConsumerConfig) -> Running {
    let deps = sistema_mensajes::consumer::Deps::default();
    let token = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (deps, token) = (deps.clone(), token.clone());
        async move {
            sistema_mensajes::consumer::run(cfg, deps, token)
                .await
                .unwrap()
        }
    });
    (deps, token, run)
}

/// [`start_consumer`], once it is Running.
pub async fn start_running(cfg: ConsumerConfig) -> Running {
    let running = start_consumer(cfg);
    wait_running(&running.0.health).await;
    running
}

pub async fn stop_consumer((_, token, run): Running) {
    token.cancel();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the consumer stops")
        .unwrap();
}

/// Writes a private key readable by its owner only, as the daemons require.
pub fn write_key(path: &std::path::Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
