//! RabbitMQ: connecting, the topology both daemons declare, and dead-letter messages.

use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use time::OffsetDateTime;

use crate::config::{AmqpConfig, QueueType};
use crate::reading::Rejection;
use crate::secret::Secret;

/// Longest wait for the broker to answer a handshake, a cancel or a close: a half-dead connection
/// must not stall the daemon.
pub const BROKER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
    #[error("no answer from RabbitMQ within {0:?}")]
    Timeout(std::time::Duration),
    #[error("RabbitMQ blocks publishers (a memory or disk alarm)")]
    Blocked,
    /// RabbitMQ refused to declare or bind one of our objects.
    #[error("cannot declare {what}: {source}")]
    Declare {
        what: String,
        #[source]
        source: lapin::Error,
    },
}

impl AmqpError {
    /// RabbitMQ refuses our topology (PRECONDITION_FAILED: an object exists with other
    /// arguments; ACCESS_REFUSED: no permission; NOT_FOUND: with `amqp.declare = false`, an
    /// object nobody declared yet): waiting alone will not mend it.
    pub fn is_refusal(&self) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
        match self {
            AmqpError::Declare { source, .. } => matches!(
                source.kind(),
                lapin::ErrorKind::ProtocolError(e) if matches!(
                    e.kind(),
                    AMQPErrorKind::Soft(
                        AMQPSoftError::PRECONDITIONFAILED
                            | AMQPSoftError::ACCESSREFUSED
                            | AMQPSoftError::NOTFOUND
                    )
                )
            ),
            _ => false,
        }
    }

    /// The TLS check that failed, if the connection failed in its TLS handshake.
    pub fn tls_check(&self) -> Option<&'static str> {
        match self {
            AmqpError::Lapin(e) => lapin_tls_check(e),
            _ => None,
        }
    }

    /// For the status line.
    pub fn problem(&self) -> String {
        if let Some(check) = self.tls_check() {
            return format!("TLS to RabbitMQ failed: {check}: {self}");
        }
        match self.is_refusal() {
            true => format!("RabbitMQ refuses our topology: {self}"),
            false => format!("broker unreachable: {self}"),
        }
    }
}

/// The TLS check a lapin error reports as failed (its I/O error wraps rustls's).
pub fn lapin_tls_check(e: &lapin::Error) -> Option<&'static str> {
    match e.kind() {
        lapin::ErrorKind::IOError(io) => crate::tls::failed_check(io.as_ref()),
        _ => crate::tls::failed_check(e),
    }
}

/// `what` for the errors of a declare.
fn declaring(what: impl FnOnce() -> String) -> impl FnOnce(lapin::Error) -> AmqpError {
    move |source| AmqpError::Declare {
        what: what(),
        source,
    }
}

/// How often a write waiting on a blocked connection says it is alive.
const BLOCKED_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Awaits a write (a publish, whose frames lapin's io loop sends) on `conn`. While RabbitMQ
/// blocks the connection (`connection.blocked`: a memory or disk alarm) nothing is written, and
/// waiting is healthy: `alive` is called every second and the wait goes on, until the broker
/// unblocks it or `token` is cancelled ([`AmqpError::Blocked`]). Otherwise the wait is bounded by
/// [`BROKER_TIMEOUT`].
pub async fn write<T>(
    conn: &lapin::ConnectionStatus,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
    alive: impl Fn(),
    token: &tokio_util::sync::CancellationToken,
) -> Result<T, AmqpError> {
    let mut fut = std::pin::pin!(fut);
    let mut waited = std::time::Duration::ZERO;
    loop {
        tokio::select! {
            result = &mut fut => return Ok(result?),
            _ = token.cancelled(), if conn.blocked() => return Err(AmqpError::Blocked),
            _ = tokio::time::sleep(BLOCKED_TICK) => {
                if conn.blocked() {
                    alive();
                    waited = std::time::Duration::ZERO;
                } else {
                    waited += BLOCKED_TICK;
                    if waited >= BROKER_TIMEOUT {
                        return Err(AmqpError::Timeout(BROKER_TIMEOUT));
                    }
                }
            }
        }
    }
}

/// `fut`, or [`AmqpError::Timeout`] after [`BROKER_TIMEOUT`].
pub async fn bounded<T, E: Into<AmqpError>>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(BROKER_TIMEOUT, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(AmqpError::Timeout(BROKER_TIMEOUT)),
    }
}

/// Closes a connection politely, but gives up after [`BROKER_TIMEOUT`].
pub async fn close(conn: &Connection, why: &str) {
    if let Err(e) = bounded(conn.close(200, why.into())).await {
        tracing::debug!(message = "Closing the RabbitMQ connection failed.", error = %e);
    }
}

/// AMQP delivery mode of a message that survives a broker restart.
pub const PERSISTENT: u8 = 2;

pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Largest AMQP frame we ask for unless the URL says otherwise (`?frame_max=`). lapin keeps 32
/// frames of buffer each way, and its ring buffers touch all of it in time, so RabbitMQ's default
/// of 128 KiB costs about 3.5 MiB more resident memory on a consumer draining a backlog (measured:
/// 8.8-9.5 MiB against 12.3-12.5 MiB peak for 100,000 readings); readings and our dead letters
/// (original headers capped at 4 KiB) fit in far less, and larger bodies are simply split into
/// more frames.
pub const FRAME_MAX: u32 = 16 * 1024;

/// The frame size the consumer reconnects with when a message's headers (which the broker never
/// splits) did not fit in [`FRAME_MAX`]: RabbitMQ's own default and usual maximum, 128 KiB, so
/// any message it accepted can be received.
pub const LARGE_FRAME_MAX: u32 = 128 * 1024;

/// lapin closed the connection because a frame exceeded the negotiated `frame_max`
/// (FRAME_ERROR, "frame too large").
pub fn is_frame_too_large(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError};
    let frame_error = |e: &lapin::Error| match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => {
            matches!(p.kind(), AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR))
        }
        _ => false,
    };
    frame_error(e) || e.to_string().contains("frame too large")
}

/// Connects; `name` shows in the RabbitMQ management UI. The URI holds the password: never log it.
/// `frame_max`: `None` for the URL's `?frame_max=`, else [`FRAME_MAX`]; `Some` forces a size.
/// With `amqps://`, the TLS client of [`tls_client`], its files read anew at every connection.
pub async fn connect(
    uri: &Secret,
    name: &str,
    frame_max: Option<u32>,
) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let io_error =
        |e: std::io::Error| lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(e)));
    let invalid = |e: String| io_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e));
    let parsed = parse_uri(uri.expose(), frame_max).map_err(invalid)?;
    let url = url::Url::parse(uri.expose()).map_err(|e| invalid(e.to_string()))?;
    let tls = match tls_client(&url).map_err(invalid)? {
        None => None,
        Some(client) => {
            let config = client.config.config().map_err(|e| invalid(e.to_string()))?;
            let connector = lapin::tcp::RustlsConnector::from(std::sync::Arc::new(config));
            Some((connector, client.server_name))
        }
    };
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        parsed,
        runtime,
        async move |uri: lapin::uri::AMQPUri, runtime: async_rs::TokioRuntime| {
            // lapin runs this on its own thread, which nothing cancels: the connect and the
            // handshake are bounded here, or a peer that never answers would hold it for good.
            let connected = tokio::time::timeout(BROKER_TIMEOUT, async {
                let addr =
                    runtime.to_socket_addrs((uri.authority.host.clone(), uri.authority.port));
                let stream = lapin::tcp::AsyncTcpStream::connect(&runtime, addr).await?;
                match &tls {
                    None => Ok(stream),
                    Some((connector, name)) => stream.into_rustls(connector, name).await,
                }
            });
            match connected.await {
                Ok(result) => result.map_err(io_error),
                Err(_) => Err(io_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no TCP connection and TLS handshake within {BROKER_TIMEOUT:?}"),
                ))),
            }
        },
        props,
    )
    .await
}

/// The TLS side of an `amqps://` URL, with the query parameters RabbitMQ documents for its clients.
#[derive(Debug)]
pub struct TlsClient {
    pub config: crate::tls::Client,
    /// The name sent (SNI) and checked in the certificate: `server_name_indication`, else the host.
    pub server_name: String,
}

/// RabbitMQ's names for the files (<https://www.rabbitmq.com/docs/uri-query-parameters>).
pub const TLS_KEYS: crate::tls::Keys = crate::tls::Keys {
    ca: "cacertfile",
    cert: "certfile",
    key: "keyfile",
};

/// The TLS client an `amqps://` URL asks for (`None` for `amqp://`). The server's certificate is
/// always checked, chain and name: `verify=verify_none` is refused, as is any TLS parameter on a
/// plain `amqp://` URL (it would protect nothing), and `auth_mechanism=external` needs a client
/// certificate. The error names the parameter; it never holds the URL.
pub fn tls_client(url: &url::Url) -> Result<Option<TlsClient>, String> {
    let mut client = crate::tls::Client {
        verify: crate::tls::Verify::Full,
        ca: None,
        cert: None,
        key: None,
        keys: TLS_KEYS,
    };
    let mut server_name = None;
    let mut external = false;
    let mut tls_parameter = None;
    let params = crate::tls::query_parameters(url);
    let ours = [
        "cacertfile",
        "certfile",
        "keyfile",
        "server_name_indication",
        "verify",
        "auth_mechanism",
    ];
    if let Some(k) = crate::tls::repeated(&params, &ours) {
        return Err(format!("`{k}` is given twice"));
    }
    for (k, v, _) in params {
        let path = || Some(std::path::PathBuf::from(&v));
        match k.as_str() {
            "cacertfile" => client.ca = path(),
            "certfile" => client.cert = path(),
            "keyfile" => client.key = path(),
            "server_name_indication" if v == "disable" || v.is_empty() => {
                return Err("`server_name_indication` must name the host the certificate is for; `disable` is not supported".into())
            }
            "server_name_indication" => server_name = Some(v.clone()),
            "verify" if v == "verify_peer" => {}
            "verify" => {
                return Err(format!(
                    "`verify={v}` is refused: the broker's certificate is always checked (use `verify_peer` or leave it out), since without that the password goes to whoever answers"
                ))
            }
            "password" => {
                return Err("`password` (of a PKCS#12 file) is not supported: give `certfile` and `keyfile` as PEM files, the key unencrypted and readable only by the daemon".into())
            }
            "auth_mechanism" => external = v.eq_ignore_ascii_case("external"),
            _ => continue,
        }
        if k != "auth_mechanism" {
            tls_parameter.get_or_insert(k);
        }
    }
    if url.scheme() != "amqps" {
        if let Some(k) = tls_parameter {
            return Err(format!(
                "`{k}` applies only to `amqps://` URLs; this one is plain `amqp://`"
            ));
        }
        if external {
            return Err(
                "`auth_mechanism=external` logs in with a client certificate: it needs `amqps://`"
                    .into(),
            );
        }
        return Ok(None);
    }
    if external && client.cert.is_none() {
        return Err("`auth_mechanism=external` logs in with a client certificate: it needs `certfile` and `keyfile`".into());
    }
    client.check()?;
    let server_name = match server_name {
        Some(name) => name,
        None => match url.host() {
            Some(url::Host::Domain(d)) => percent_decode(d),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err("the URL names no host".into()),
        },
    };
    rustls::pki_types::ServerName::try_from(server_name.as_str())
        .map_err(|_| format!("`{server_name}` is not a host name TLS can check"))?;
    Ok(Some(TlsClient {
        config: client,
        server_name,
    }))
}

/// The URI lapin connects with. amq-protocol-uri takes the host from `Url::domain()`, which is
/// `None` for an IP literal, and then falls back to `localhost`: `amqp://u:p@[2001:db8::1]/` and
/// `amqp://u:p@10.0.0.5/` would send the password to whatever listens on the local port. The
/// host is taken from the URL's `host()` instead (an IPv6 address without its brackets, as the
/// socket address parser wants it). The error never holds the URI.
pub fn parse_uri(s: &str, frame_max: Option<u32>) -> Result<lapin::uri::AMQPUri, String> {
    let url = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    let host = match url.host() {
        Some(url::Host::Domain(d)) => percent_decode(d),
        Some(url::Host::Ipv4(a)) => a.to_string(),
        Some(url::Host::Ipv6(a)) => a.to_string(),
        None => return Err("the URL names no host".into()),
    };
    let mut uri: lapin::uri::AMQPUri = s.parse().map_err(|_| "not an AMQP URL".to_owned())?;
    uri.authority.host = host;
    uri.query.frame_max = frame_max.or(uri.query.frame_max).or(Some(FRAME_MAX));
    Ok(uri)
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

fn durable_exchange(cfg: &AmqpConfig) -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        passive: !cfg.declare,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue(cfg: &AmqpConfig) -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: !cfg.declare,
        ..QueueDeclareOptions::durable()
    }
}

/// `what` of a declare, saying so when it is only a check (`amqp.declare = false`).
fn object(cfg: &AmqpConfig, what: String) -> String {
    match cfg.declare {
        true => what,
        false => format!(
            "{what}, checked only (amqp.declare = false: the provisioning step, or `consumer declare-topology`, declares it)"
        ),
    }
}

/// Arguments of a queue of `queue_type`. `Classic` declares none, so a queue the older system created
/// (durable, no arguments) is redeclared without a PRECONDITION_FAILED.
fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// [`queue_arguments`] as the errors name them.
fn described(queue_type: QueueType) -> &'static str {
    match queue_type {
        QueueType::Quorum => "x-queue-type=quorum",
        QueueType::Classic => "no arguments",
    }
}

/// Declares, idempotently, the durable direct exchange, the durable queue and their binding; with
/// `dead_letter`, also the fanout dead-letter exchange and its queue. Dead-lettering does not rely
/// on queue arguments: the consumer republishes rejected messages there itself.
///
/// With `amqp.declare = false` the declares are passive, which needs no permission at all: each
/// object must exist (else NOT_FOUND, a refusal the daemon waits out), bindings are not checked,
/// and the users need no `configure` permission (docs/security.md, "Least privilege").
pub async fn declare_topology(
    ch: &Channel,
    cfg: &AmqpConfig,
    dead_letter: bool,
) -> Result<(), AmqpError> {
    let (exchange, queue) = (cfg.exchange.as_str(), cfg.queue.as_str());
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Direct,
        durable_exchange(cfg),
        FieldTable::default(),
    )
    .await
    .map_err(declaring(|| {
        object(cfg, format!("exchange `{exchange}` (direct, durable)"))
    }))?;
    ch.queue_declare(
        queue.into(),
        durable_queue(cfg),
        queue_arguments(cfg.queue_type),
    )
    .await
    .map_err(declaring(|| {
        object(
            cfg,
            format!(
                "queue `{queue}` (durable, {}; amqp.queue_type)",
                described(cfg.queue_type)
            ),
        )
    }))?;
    if !cfg.declare {
        if dead_letter {
            declare_dead_letter(ch, cfg).await?;
        }
        return Ok(());
    }
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        cfg.routing_key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(declaring(|| {
        format!(
            "the binding of `{queue}` to `{exchange}` with key `{}`",
            cfg.routing_key.as_str()
        )
    }))?;
    if dead_letter {
        declare_dead_letter(ch, cfg).await?;
    }
    Ok(())
}

/// Declares, idempotently, the fanout dead-letter exchange and its queue, bound together.
pub async fn declare_dead_letter(ch: &Channel, cfg: &AmqpConfig) -> Result<(), AmqpError> {
    let (exchange, queue) = (
        cfg.dead_letter_exchange.as_str(),
        cfg.dead_letter_queue.as_str(),
    );
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Fanout,
        durable_exchange(cfg),
        FieldTable::default(),
    )
    .await
    .map_err(declaring(|| {
        object(
            cfg,
            format!("dead-letter exchange `{exchange}` (fanout, durable)"),
        )
    }))?;
    ch.queue_declare(
        queue.into(),
        durable_queue(cfg),
        queue_arguments(cfg.dead_letter_queue_type),
    )
    .await
    .map_err(declaring(|| {
        object(
            cfg,
            format!(
                "dead-letter queue `{queue}` (durable, {}; amqp.dead_letter_queue_type)",
                described(cfg.dead_letter_queue_type)
            ),
        )
    }))?;
    if !cfg.declare {
        return Ok(());
    }
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(declaring(|| {
        format!("the binding of `{queue}` to `{exchange}`")
    }))?;
    Ok(())
}

/// Headers of a dead letter beyond which the original's are dropped: with ours added they must
/// fit in one frame (RabbitMQ never splits a content header), and they are only kept for the
/// operator's information.
pub const DEAD_LETTER_HEADER_BYTES: usize = 4096;

/// Longest `x-rejection-detail`: a database's message (a trigger's `RAISE`) can be long, and the
/// headers must fit in one frame.
pub const MAX_DETAIL_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Properties for the dead-letter copy of a message: persistent, with headers saying why
/// (`x-rejection-reason`, `x-rejection-detail`) and where it came from. Built from an allowlist
/// of the original's properties: not `user_id` (the broker refuses a publish whose `user_id` is
/// not the publishing user's, closing the channel) nor `expiration` (the copy would vanish from
/// the dead-letter queue; RabbitMQ's own dead-lettering drops it too). The original headers are
/// kept while they are small ([`DEAD_LETTER_HEADER_BYTES`]); larger ones are dropped, and
/// `x-original-headers-dropped` says so.
pub fn dead_letter_properties(
    original: &BasicProperties,
    rejection: &Rejection,
    exchange: &ShortString,
    routing_key: &ShortString,
) -> BasicProperties {
    let kept = original
        .headers()
        .clone()
        .filter(|h| header_bytes(h) <= DEAD_LETTER_HEADER_BYTES);
    let dropped = original.headers().is_some() && kept.is_none();
    let mut headers = kept.unwrap_or_default();
    if dropped {
        headers.insert(
            "x-original-headers-dropped".into(),
            AMQPValue::Boolean(true),
        );
    }
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    headers.insert("x-rejection-reason".into(), text(rejection.reason.as_str()));
    headers.insert(
        "x-rejection-detail".into(),
        text(truncated(&rejection.detail, MAX_DETAIL_BYTES)),
    );
    headers.insert("x-original-exchange".into(), text(exchange.as_str()));
    headers.insert("x-original-routing-key".into(), text(routing_key.as_str()));
    headers.insert(
        "x-rejected-at".into(),
        AMQPValue::Timestamp(
            OffsetDateTime::now_utc()
                .unix_timestamp()
                .max(0)
                .unsigned_abs(),
        ),
    );
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT);
    if let Some(v) = original.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = original.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        props = props.with_app_id(v.clone());
    }
    props
}

/// Marks a dead letter whose body was cut (`x-body-truncated`, `x-original-bytes`): it cannot be
/// replayed as it is.
pub fn mark_truncated(props: BasicProperties, original_bytes: usize) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert("x-body-truncated".into(), AMQPValue::Boolean(true));
    headers.insert(
        "x-original-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(original_bytes).unwrap_or(i64::MAX)),
    );
    props.with_headers(headers)
}

/// Roughly how many bytes `headers` take on the wire (an upper bound for strings and bytes).
fn header_bytes(headers: &FieldTable) -> usize {
    fn value(v: &AMQPValue) -> usize {
        match v {
            AMQPValue::LongString(s) => s.as_bytes().len() + 5,
            AMQPValue::ShortString(s) => s.as_str().len() + 2,
            AMQPValue::ByteArray(b) => b.as_slice().len() + 5,
            AMQPValue::FieldTable(t) => header_bytes(t) + 5,
            AMQPValue::FieldArray(a) => a.as_slice().iter().map(value).sum::<usize>() + 5,
            _ => 9,
        }
    }
    headers
        .inner()
        .iter()
        .map(|(k, v)| k.as_str().len() + 1 + value(v))
        .sum()
}

/// Reads a string header (as RabbitMQ stores them: long strings).
pub fn header_str<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a str> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Properties of a reading we publish. No `timestamp` property: the body's `measured_at` says
/// when, and the benchmark showed that the extra property costs RabbitMQ about a quarter more CPU
/// per delivery (broker CPU per 1,000 drained readings 37 ms without it, 50 ms with it).
pub fn reading_properties(message_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_delivery_mode(PERSISTENT)
        .with_message_id(message_id.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_the_urls_whatever_its_kind() {
        for (url, host) in [
            ("amqp://u:p@[2001:db8::1]:5672/%2f", "2001:db8::1"),
            ("amqp://u:p@[::1]/", "::1"),
            ("amqp://u:p@10.0.0.5:5673/", "10.0.0.5"),
            ("amqp://u:p@127.0.0.1/", "127.0.0.1"),
            ("amqp://u:p@rabbit.example.org/", "rabbit.example.org"),
            ("amqps://rabbit-1/", "rabbit-1"),
        ] {
            let uri = parse_uri(url, None).unwrap();
            assert_eq!(uri.authority.host, host, "{url}");
            assert_eq!(uri.query.frame_max, Some(FRAME_MAX));
        }
        let uri = parse_uri("amqp://u:p@[2001:db8::1]:5673/v?frame_max=4096", None).unwrap();
        assert_eq!((uri.authority.port, uri.vhost.as_str()), (5673, "v"));
        assert_eq!(uri.query.frame_max, Some(4096));
        // Forced (the consumer's larger frames), whatever the URL says.
        let uri = parse_uri("amqp://h/?frame_max=4096", Some(LARGE_FRAME_MAX)).unwrap();
        assert_eq!(uri.query.frame_max, Some(LARGE_FRAME_MAX));
        let uri = parse_uri("amqp://rabbit%2Done+two/", None).unwrap();
        assert_eq!(uri.authority.host, "rabbit-one+two");
    }

    #[test]
    fn dead_letter_properties_come_from_an_allowlist() {
        use crate::reading::{RejectReason, Rejection};
        let mut headers = FieldTable::default();
        headers.insert("trace".into(), AMQPValue::LongString("abc".into()));
        let original = BasicProperties::default()
            .with_user_id("someone-else".into())
            .with_expiration("1".into())
            .with_reply_to("q".into())
            .with_priority(9)
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_headers(headers);
        let rejection = Rejection::new(RejectReason::MalformedJson, "x");
        let (x, k) = ("weather".into(), "weather_key".into());
        let p = dead_letter_properties(&original, &rejection, &x, &k);
        assert_eq!(
            p.user_id(),
            &None,
            "the broker refuses another user's user_id"
        );
        assert_eq!(
            p.expiration(),
            &None,
            "the copy would vanish from the dead-letter queue"
        );
        assert_eq!(p.reply_to(), &None);
        assert_eq!(p.priority(), &None);
        assert_eq!(p.message_id(), &Some("m-1".into()));
        assert_eq!(p.content_type(), &Some("application/json".into()));
        assert_eq!(p.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(header_str(&p, "trace"), Some("abc"));
        assert_eq!(header_str(&p, "x-rejection-reason"), Some("malformed_json"));

        let mut big = FieldTable::default();
        big.insert(
            "blob".into(),
            AMQPValue::LongString("x".repeat(20_000).into()),
        );
        let p = dead_letter_properties(&original.clone().with_headers(big), &rejection, &x, &k);
        let h = p.headers().as_ref().unwrap().inner();
        assert!(!h.contains_key("blob"));
        assert_eq!(
            h.get("x-original-headers-dropped"),
            Some(&AMQPValue::Boolean(true))
        );
        assert_eq!(header_str(&p, "x-rejection-reason"), Some("malformed_json"));

        let long = Rejection::new(RejectReason::DatabaseRejected, "é".repeat(5000));
        let p = dead_letter_properties(&original, &long, &x, &k);
        let detail = header_str(&p, "x-rejection-detail").unwrap();
        assert!(detail.len() <= MAX_DETAIL_BYTES && detail.len() >= MAX_DETAIL_BYTES - 1);
    }

    #[test]
    fn a_bad_uri_is_not_echoed() {
        let e = parse_uri("amqp://u:s3cret@[::1/", None).unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
