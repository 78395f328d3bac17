//! The brokers a daemon may use (`amqp.url`: one, or the nodes of a RabbitMQ cluster) and the one
//! reconnect loop both daemons run on them: connect to the first broker that answers, work on the
//! link until it is done or lost, then connect again, trying the next broker first. RabbitMQ does
//! the clustering and the queue's replication; all we add is which node to try.

use std::future::Future;

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::amqp::AmqpError;
use crate::config::RetryConfig;
use crate::health::{Health, Phase};
use crate::retry;
use crate::secret::Secret;

/// The brokers, in the configured order, each with its URI (password included: never logged) and
/// its address for logs; and which one to try next.
#[derive(Clone)]
pub struct Brokers {
    nodes: Vec<(String, Secret)>,
    next: usize,
}

impl Brokers {
    /// `nodes`: (address for logs, URI). At least one (the config's `amqp.url` never is empty).
    pub(crate) fn new(nodes: Vec<(String, Secret)>) -> Self {
        Self { nodes, next: 0 }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always `false` for brokers from the config, which names at least one.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The broker to try now (address, URI): the one after the last tried, round the list.
    pub fn advance(&mut self) -> Option<(&str, &Secret)> {
        let i = self.next % self.nodes.len().max(1);
        self.next = i + 1;
        self.nodes.get(i).map(|(a, u)| (a.as_str(), u))
    }

    /// A connection named `name` to the next broker only, within
    /// [`crate::amqp::BROKER_TIMEOUT`]: for a link retried by its owner (the consumer's dead-letter
    /// link, which the writer waits for), so that one attempt never costs more than one bound.
    pub async fn connect_next(
        &mut self,
        name: &str,
        frame_max: Option<u32>,
    ) -> Result<lapin::Connection, AmqpError> {
        let Some((_, uri)) = self.advance() else {
            return Err(AmqpError::Timeout(crate::amqp::BROKER_TIMEOUT));
        };
        crate::amqp::bounded(crate::amqp::connect(uri, name, frame_max)).await
    }

    /// A connection named `name` to the first broker that answers, each attempt within
    /// [`crate::amqp::BROKER_TIMEOUT`], for what connects once (the dead-letter link, `replay`,
    /// `declare-topology`); failures are logged. The last error if none answers.
    pub async fn connect(
        &mut self,
        name: &str,
        frame_max: Option<u32>,
    ) -> Result<(lapin::Connection, String), AmqpError> {
        let mut last = AmqpError::Timeout(crate::amqp::BROKER_TIMEOUT);
        let several = self.len() > 1;
        for _ in 0..self.len() {
            let Some((broker, uri)) = self.advance() else {
                break;
            };
            match crate::amqp::bounded(crate::amqp::connect(uri, name, frame_max)).await {
                Ok(conn) => return Ok((conn, broker.to_owned())),
                Err(e) => {
                    if several {
                        warn!(message = "Cannot reach a broker; trying the next.", connection = name, error = %e, broker);
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// Why [`Session::work`] gave up a link.
pub struct Lost {
    /// For the status line: `broker connection lost: {reason}`.
    pub reason: String,
    /// A failure (counted in `amqp_connection_errors_total`, then backoff), or a reason to
    /// reconnect at once (the consumer's larger frames).
    pub failure: bool,
}

/// A daemon's work on the broker, which [`run`] opens, reopens and hands links to.
pub trait Session {
    type Link;
    /// Opens a link on `uri` (connection, channel, topology), within
    /// [`crate::amqp::BROKER_TIMEOUT`].
    fn open(&mut self, uri: &Secret) -> impl Future<Output = Result<Self::Link, AmqpError>> + Send;
    /// Work starts on a link to `broker` (logs it).
    fn started(&mut self, broker: &str);
    /// Works on `link` until done (`Ok`: [`run`] returns it, open) or it is lost (`Err`, logged
    /// by the session, which knows what was in flight; [`run`] closes it).
    fn work(
        &mut self,
        link: &Self::Link,
        broker: &str,
        token: &CancellationToken,
    ) -> impl Future<Output = Result<(), Lost>> + Send;
    /// Disposes of a link given up on (never for long: the broker may be gone).
    fn close(&mut self, link: Self::Link) -> impl Future<Output = ()> + Send;
}

/// What [`run`] needs around the session.
pub struct Around<'a> {
    pub retry: &'a RetryConfig,
    pub health: &'a Health,
    /// `amqp_connection_errors_total`: failed attempts and lost links.
    pub errors: &'a IntCounter,
    /// `receiving` or `sending`, for the logs.
    pub stage: &'static str,
    pub token: &'a CancellationToken,
}

/// Links one after another until the session is done (its last link, still open) or `token` is
/// cancelled (`None`). Attempts to connect go round the brokers, with backoff after each round
/// in which none answered; after a lost link the next broker is tried first, and the backoff
/// grows while links keep failing soon after they open ([`retry::Reconnect`]).
pub async fn run<S: Session>(
    session: &mut S,
    brokers: &mut Brokers,
    around: Around<'_>,
) -> Option<S::Link> {
    let Around {
        retry: retry_cfg,
        health,
        errors,
        stage,
        token,
    } = around;
    let mut reconnect = retry::Reconnect::new(retry_cfg);
    loop {
        health.set_phase(Phase::WaitingForBroker);
        let mut delays = retry::delays(retry_cfg);
        let mut rounds: u64 = 0;
        let brokers_len = brokers.len();
        let (link, broker) = 'connected: loop {
            let mut last = None;
            for _ in 0..brokers.len() {
                let Some((broker, uri)) = brokers.advance() else {
                    break;
                };
                health.beat();
                let result = tokio::select! {
                    _ = token.cancelled() => return None,
                    r = session.open(uri) => r,
                };
                match result {
                    Ok(link) => break 'connected (link, broker.to_owned()),
                    Err(e) => {
                        errors.inc();
                        health.set_problem(Some(e.problem()));
                        if let Some(check) = e.tls_check() {
                            error!(message = "TLS to RabbitMQ failed; retrying in case the server is fixed.", check, error = %e, error_type = "tls", stage, broker);
                        } else if e.is_refusal() {
                            error!(message = "RabbitMQ refuses our topology; retrying in case it is mended.", error = %e, error_type = "topology_refused", stage, broker);
                        } else if brokers_len > 1 {
                            warn!(message = "Cannot reach a broker; trying the next.", error = %e, stage, broker);
                        }
                        last = Some(e);
                    }
                }
            }
            rounds += 1;
            if let Some(e) = last {
                // With one broker, a round is an attempt, and this line is the one it always was.
                warn!(message = "Cannot reach a dependency; retrying.", what = "rabbitmq", error = %e, failures = rounds, brokers = brokers_len, stage);
            }
            if !retry::pause(&mut delays, token).await {
                return None;
            }
        };
        health.set_problem(None);
        health.set_phase(Phase::Running);
        reconnect.connected();
        session.started(&broker);
        match session.work(&link, &broker, token).await {
            Ok(()) => return Some(link),
            Err(lost) => {
                session.close(link).await;
                if lost.failure {
                    errors.inc();
                    health.set_problem(Some(format!("broker connection lost: {}", lost.reason)));
                    if !reconnect.pause(token).await {
                        return None;
                    }
                }
            }
        }
    }
}
