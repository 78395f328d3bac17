//! Capped exponential backoff (from `backon`) that gives way to shutdown.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::RetryConfig;

/// Endless delays: `min_delay`, doubling, capped at `max_delay`, with jitter.
pub fn delays(cfg: &RetryConfig) -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(cfg.min_delay)
        .with_max_delay(cfg.max_delay)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleeps for the next delay. Returns `false`, at once, if `token` is cancelled first.
pub async fn pause(
    delays: &mut (impl Iterator<Item = Duration> + Send),
    token: &CancellationToken,
) -> bool {
    let delay = delays.next().unwrap_or(Duration::from_secs(1));
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Calls `attempt` until it succeeds, logging each failure with `what` and calling `on_error`.
/// Returns `None` if `token` is cancelled first.
pub async fn until_ok<T, E, F, Fut>(
    what: &'static str,
    cfg: &RetryConfig,
    token: &CancellationToken,
    mut attempt: F,
    mut on_error: impl FnMut(&E),
) -> Option<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = delays(cfg);
    let mut failures: u64 = 0;
    loop {
        let result = tokio::select! {
            _ = token.cancelled() => return None,
            r = attempt() => r,
        };
        match result {
            Ok(v) => return Some(v),
            Err(e) => {
                failures += 1;
                on_error(&e);
                warn!(message = "Cannot reach a dependency; retrying.", what, error = %e, failures);
                if !pause(&mut delays, token).await {
                    return None;
                }
            }
        }
    }
}

/// The backoff between lost connections: it grows while connections fail one after another, and
/// starts again from `min_delay` once a connection has lasted `max_delay` (without the reset,
/// after about seven lost links in a daemon's life every reconnect waited 10 to 20 s).
pub struct Reconnect {
    cfg: RetryConfig,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    since: tokio::time::Instant,
}

impl Reconnect {
    pub fn new(cfg: &RetryConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            delays: Box::new(delays(cfg)),
            since: tokio::time::Instant::now(),
        }
    }

    /// A connection is up: from now on it counts how long it lasts.
    pub fn connected(&mut self) {
        self.since = tokio::time::Instant::now();
    }

    /// The next delay after a connection was lost.
    pub fn next_delay(&mut self) -> Duration {
        if self.since.elapsed() >= self.cfg.max_delay {
            self.delays = Box::new(delays(&self.cfg));
        }
        self.delays.next().unwrap_or(self.cfg.min_delay)
    }

    /// Sleeps for [`Self::next_delay`]. Returns `false`, at once, if `token` is cancelled first.
    pub async fn pause(&mut self, token: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = token.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_reconnect_backoff_starts_again_after_a_connection_that_lasted() {
        let cfg = RetryConfig {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        };
        let mut r = Reconnect::new(&cfg);
        // Links lost one after another: the delays grow to the cap.
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            r.connected();
            last = r.next_delay();
        }
        assert!(last >= Duration::from_secs(10), "{last:?}");
        // A link that lasted `max_delay`: back to the first delay.
        r.connected();
        tokio::time::advance(Duration::from_secs(10)).await;
        let first = r.next_delay();
        assert!(first <= Duration::from_millis(200), "{first:?}");
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let cfg = RetryConfig {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        };
        let d: Vec<_> = delays(&cfg).take(12).collect();
        assert_eq!(d.len(), 12, "endless");
        // Jitter adds up to one more base delay.
        assert!(
            d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(200),
            "{d:?}"
        );
        assert!(d.iter().all(|x| *x <= Duration::from_secs(4)), "{d:?}");
        assert!(d[11] >= Duration::from_secs(2), "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn until_ok_retries_then_succeeds_and_stops_on_cancel() {
        let cfg = RetryConfig::default();
        let token = CancellationToken::new();
        let mut n = 0;
        let mut errors = 0;
        let v = until_ok(
            "test",
            &cfg,
            &token,
            || {
                n += 1;
                let ok = n >= 3;
                async move {
                    if ok {
                        Ok(n)
                    } else {
                        Err("down")
                    }
                }
            },
            |_| errors += 1,
        )
        .await;
        assert_eq!(v, Some(3));
        assert_eq!(errors, 2);
        token.cancel();
        let v: Option<()> = until_ok(
            "test",
            &cfg,
            &token,
            || async { Err("down") },
            |_: &&str| {},
        )
        .await;
        assert_eq!(v, None);
    }
}
