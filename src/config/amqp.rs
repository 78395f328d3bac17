//! `[amqp]`: the broker (one URL, or a cluster's nodes), the topology's names and queue types,
//! and what the daemons connect with.

use super::*;

/// A RabbitMQ exchange, queue or routing key name: at most 255 bytes (an AMQP short string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AmqpName(String);

impl TryFrom<String> for AmqpName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.len() > 255 {
            return Err(format!("`{s}` must be 1 to 255 bytes long"));
        }
        Ok(Self(s))
    }
}

impl From<AmqpName> for String {
    fn from(n: AmqpName) -> String {
        n.0
    }
}

impl AmqpName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AmqpName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// Declared with no arguments, as the older Python system did.
    Classic,
    /// Declared with `x-queue-type: quorum` (a new queue only: RabbitMQ refuses to change a queue's type).
    Quorum,
}

/// RabbitMQ connection and topology.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// AMQP URI without the password, e.g. `amqp://guest@127.0.0.1:5672/%2f`; or a list of them,
    /// one per node of a RabbitMQ cluster, tried in turn.
    pub url: BrokerUrls,
    /// File holding the password. Without it, the credential `amqp-password` is used if present.
    pub password_file: Option<PathBuf>,
    /// Durable direct exchange readings are published to.
    pub exchange: AmqpName,
    pub routing_key: AmqpName,
    /// Durable queue the consumer reads, bound to `exchange` with `routing_key`.
    pub queue: AmqpName,
    pub queue_type: QueueType,
    /// Fanout exchange and queue that rejected messages are republished to, with their reason.
    pub dead_letter_exchange: AmqpName,
    pub dead_letter_queue: AmqpName,
    /// The dead-letter queue's type (a new queue only, as `queue_type`). On a RabbitMQ cluster
    /// both should be `quorum`: a classic queue lives on one node, and while that node is down
    /// it cannot be declared, so no consumer could start.
    pub dead_letter_queue_type: QueueType,
    /// Unacknowledged deliveries the broker may push to the consumer (`basic.qos`).
    pub prefetch: u16,
    /// Declare the exchanges, queues and bindings at start, which needs RabbitMQ's `configure`
    /// permission on them. With `false`, only check that they exist (passive declares, which need
    /// no permission) and wait until they do: a provisioning step owns the topology
    /// (`consumer declare-topology`), and the daemons' users need no `configure` at all.
    pub declare: bool,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: local_url("amqp://guest@127.0.0.1:5672/%2f").into(),
            password_file: None,
            exchange: AmqpName("weather".into()),
            routing_key: AmqpName("weather_key".into()),
            queue: AmqpName("weather_queue".into()),
            queue_type: QueueType::Classic,
            dead_letter_exchange: AmqpName("weather_dead_letter".into()),
            dead_letter_queue: AmqpName("weather_dead_letter".into()),
            dead_letter_queue_type: QueueType::Classic,
            prefetch: 2000,
            declare: true,
        }
    }
}

/// `amqp.url`: one broker URL, or a list of the nodes of a RabbitMQ cluster
/// (`url = ["amqp://sistema@rabbit1:5672/%2f", "amqp://sistema@rabbit2:5672/%2f"]`). A daemon
/// connects to the first that answers, and after a lost connection tries the next one first.
/// Never empty. One URL is written back as a string, several as a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrls {
    first: Url,
    rest: Vec<Url>,
}

impl From<Url> for BrokerUrls {
    fn from(first: Url) -> Self {
        Self {
            first,
            rest: Vec::new(),
        }
    }
}

impl TryFrom<Vec<Url>> for BrokerUrls {
    type Error = &'static str;

    fn try_from(urls: Vec<Url>) -> Result<Self, Self::Error> {
        let mut urls = urls.into_iter();
        let first = urls
            .next()
            .ok_or("an empty list: name at least one broker")?;
        Ok(Self {
            first,
            rest: urls.collect(),
        })
    }
}

impl BrokerUrls {
    pub fn first(&self) -> &Url {
        &self.first
    }

    pub fn first_mut(&mut self) -> &mut Url {
        &mut self.first
    }

    pub fn iter(&self) -> impl Iterator<Item = &Url> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    /// Always `false`: there is at least one URL. (Clippy asks for it beside `len`.)
    pub fn is_empty(&self) -> bool {
        false
    }

    pub(super) fn map(&self, f: impl Fn(&Url) -> Url) -> Self {
        Self {
            first: f(&self.first),
            rest: self.rest.iter().map(f).collect(),
        }
    }

    /// Error `e` of entry `i`: as is for a single URL, with "entry i (counting from 0)" in a list.
    fn describe(&self, i: usize, e: impl std::fmt::Display) -> String {
        if self.rest.is_empty() {
            e.to_string()
        } else {
            format!("entry {i} (counting from 0): {e}")
        }
    }
}

impl Serialize for BrokerUrls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.rest.is_empty() {
            s.serialize_str(self.first.as_str())
        } else {
            s.collect_seq(self.iter().map(Url::as_str))
        }
    }
}

impl<'de> Deserialize<'de> for BrokerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        // As `quiet_url`: the error never quotes the text, which may hold a password.
        let parse = |text: &str| {
            Url::parse(text).map_err(|e| serde::de::Error::custom(format!("not a valid URL ({e})")))
        };
        let texts = match OneOrMany::deserialize(d)
            .map_err(|_: D::Error| serde::de::Error::custom("expected a URL or a list of URLs"))?
        {
            OneOrMany::One(text) => vec![text],
            OneOrMany::Many(texts) => texts,
        };
        let mut urls = texts.iter().map(|t| parse(t));
        let Some(first) = urls.next() else {
            return Err(serde::de::Error::custom(
                "an empty list: name at least one broker",
            ));
        };
        Ok(Self {
            first: first?,
            rest: urls.collect::<Result<_, _>>()?,
        })
    }
}

impl AmqpConfig {
    /// Each broker URL (scheme, host, TLS parameters) and the prefetch.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, url) in self.url.iter().enumerate() {
            let describe = |e| invalid("amqp.url", self.url.describe(i, e));
            check_url(url, &["amqp", "amqps"]).map_err(describe)?;
            crate::amqp::tls_client(url).map_err(describe)?;
        }
        if self.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        Ok(())
    }

    /// With `amqps://`, the CA, certificate and key files can be read and used.
    pub fn check_tls_files(&self) -> Result<(), ConfigError> {
        for (i, url) in self.url.iter().enumerate() {
            let describe = |e| invalid("amqp.url", self.url.describe(i, e));
            if let Some(client) = crate::amqp::tls_client(url).map_err(describe)? {
                client
                    .config
                    .config()
                    .map_err(|e| describe(e.to_string()))?;
            }
        }
        Ok(())
    }

    pub fn password(&self) -> Result<Password, ConfigError> {
        let dir = credentials_dir();
        Ok(secret::load(
            "amqp.password_file",
            self.password_file.as_deref(),
            "amqp-password",
            dir.as_deref(),
        )?)
    }

    /// The brokers lapin connects to, in order, each URI with the password filled in.
    pub fn brokers(&self, password: Option<&Secret>) -> crate::broker::Brokers {
        crate::broker::Brokers::new(
            self.url
                .iter()
                .map(|url| {
                    // The url crate knows no default port for amqp(s); lapin's are 5672 and 5671.
                    let port = url.port().unwrap_or(match url.scheme() {
                        "amqps" => 5671,
                        _ => 5672,
                    });
                    let address = format!("{}:{port}", url.host_str().unwrap_or_default());
                    (
                        address,
                        Secret::new(with_password(url, password).to_string()),
                    )
                })
                .collect(),
        )
    }
}
