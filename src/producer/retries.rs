//! The retry queue: readings to publish again (nacked, returned, or unconfirmed when a
//! connection was lost), and the pause while the broker refuses readings.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RetryConfig;
use crate::retry;

use super::source::Outgoing;

pub(super) struct Retries {
    queue: VecDeque<Outgoing>,
    /// Set while readings come back refused: no retry before this, and no new reading at all.
    after: Option<Instant>,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    cfg: RetryConfig,
}

impl Retries {
    pub fn new(cfg: &RetryConfig) -> Self {
        Self {
            queue: VecDeque::new(),
            after: None,
            delays: Box::new(retry::delays(cfg)),
            cfg: cfg.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the broker refuses readings: the simulation waits until one is accepted.
    pub fn paused(&self) -> bool {
        self.after.is_some()
    }

    /// Readings that may be retried now (none before the backoff of a refusal has passed).
    pub fn due(&self) -> usize {
        match self.after {
            Some(t) if t > Instant::now() => 0,
            _ => self.queue.len(),
        }
    }

    pub fn pop(&mut self) -> Option<Outgoing> {
        self.queue.pop_front()
    }

    /// Readings sent but not confirmed, or not written: first in line, in the order given.
    pub fn put_back(&mut self, msgs: impl DoubleEndedIterator<Item = Outgoing>) {
        for msg in msgs.rev() {
            self.queue.push_front(msg);
        }
    }

    /// A reading the broker refused (nack or return): last in line, after a backoff that grows
    /// with each refusal until one is accepted. Returns the backoff.
    pub fn refused(&mut self, msg: Outgoing) -> Duration {
        let delay = self.delays.next().unwrap_or(Duration::from_secs(1));
        self.after = Some(Instant::now() + delay);
        self.queue.push_back(msg);
        delay
    }

    /// A reading was accepted: ends a pause and starts the backoff over. Returns whether it
    /// ended one.
    pub fn accepted(&mut self) -> bool {
        if self.after.take().is_none() {
            return false;
        }
        self.delays = Box::new(retry::delays(&self.cfg));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(id: &str) -> Outgoing {
        Outgoing {
            id: id.into(),
            body: Vec::new(),
            published_before: true,
            counted: false,
        }
    }

    fn ids(retries: &mut Retries) -> Vec<String> {
        std::iter::from_fn(|| retries.pop()).map(|m| m.id).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_pauses_until_its_backoff_and_an_acceptance_starts_over() {
        let cfg = RetryConfig {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        };
        let mut retries = Retries::new(&cfg);
        assert!(!retries.paused());
        retries.put_back(vec![reading("a"), reading("b")].into_iter());
        assert_eq!(retries.due(), 2);

        let delay = retries.refused(reading("refused"));
        assert!(retries.paused());
        assert!(
            delay >= cfg.min_delay && delay <= cfg.max_delay,
            "{delay:?}"
        );
        assert_eq!(retries.due(), 0, "nothing is retried before the backoff");
        tokio::time::advance(delay).await;
        assert_eq!(retries.due(), 3);

        // Unconfirmed readings go ahead of those waiting, in their order; a refused one last.
        retries.put_back(vec![reading("x"), reading("y")].into_iter());
        assert_eq!(ids(&mut retries), ["x", "y", "a", "b", "refused"]);

        assert!(retries.accepted(), "the first acceptance ends the pause");
        assert!(!retries.paused());
        assert!(!retries.accepted(), "and only the first");
    }
}
