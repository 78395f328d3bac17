//! What the daemon is doing, shared between its loops and whoever reports it (sd-notify STATUS,
//! readiness, the watchdog). Loops call [`Health::beat`] on every iteration, so a loop that stops
//! iterating shows up as a stale heartbeat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    WaitingForDatabase,
    WaitingForBroker,
    Running,
    Stopping,
}

impl Phase {
    /// Every phase, in the order a daemon goes through them.
    pub const ALL: [Phase; 5] = [
        Phase::Starting,
        Phase::WaitingForDatabase,
        Phase::WaitingForBroker,
        Phase::Running,
        Phase::Stopping,
    ];

    /// The `phase` label of `sistema_mensajes_ready`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::WaitingForDatabase => "waiting_for_database",
            Phase::WaitingForBroker => "waiting_for_broker",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
        }
    }
}

#[derive(Debug)]
pub struct Health {
    started: Instant,
    phase: watch::Sender<Phase>,
    heartbeat_ms: AtomicU64,
    /// When the current unit of work (storing a batch) started or last made progress; 0 = idle.
    busy_since_ms: AtomicU64,
    /// Whether no unit of work is under way, for [`idle`](Self::idle).
    idle: watch::Sender<bool>,
    problem: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            phase: watch::Sender::new(Phase::Starting),
            heartbeat_ms: AtomicU64::new(0),
            busy_since_ms: AtomicU64::new(0),
            idle: watch::Sender::new(true),
            problem: Mutex::new(None),
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
        self.beat();
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means "idle" for `busy_since_ms`.
        u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The main loop made progress, or waited healthily (an idle tick, a retry, backpressure).
    pub fn beat(&self) {
        self.heartbeat_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A unit of work (storing a batch) started, or made progress (a retry).
    pub fn work_started(&self) {
        self.busy_since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.idle
            .send_if_modified(|idle| std::mem::replace(idle, false));
    }

    /// The unit of work is finished; waiting for the next is healthy.
    pub fn work_done(&self) {
        self.busy_since_ms.store(0, Ordering::Relaxed);
        self.idle
            .send_if_modified(|idle| !std::mem::replace(idle, true));
    }

    /// Whether no unit of work is under way.
    pub fn is_idle(&self) -> bool {
        *self.idle.borrow()
    }

    /// Resolves once no unit of work is under way (at once if none is). Cancel-safe.
    pub async fn idle(&self) {
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = self.idle.subscribe().wait_for(|idle| *idle).await;
    }

    /// `Some(how long)` if the main loop has not beaten, or one unit of work has made no
    /// progress, for longer than `limit`: a hung insert, a deadlock.
    pub fn stalled(&self, limit: Duration) -> Option<Duration> {
        let now = self.now_ms();
        let beat = now.saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed));
        let busy = match self.busy_since_ms.load(Ordering::Relaxed) {
            0 => 0,
            since => now.saturating_sub(since),
        };
        let worst = Duration::from_millis(beat.max(busy));
        (worst > limit).then_some(worst)
    }

    /// Time since the last [`beat`](Self::beat).
    pub fn since_beat(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// A short sentence saying what is wrong, or `None` to clear it.
    pub fn set_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.problem.lock() {
            *p = problem;
        }
    }

    pub fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|p| p.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stale_heartbeat_is_reported() {
        let step = Duration::from_millis(30);
        let h = Health::new();
        h.beat();
        tokio::time::advance(step).await;
        assert!(h.stalled(Duration::from_millis(10)).is_some());
        h.beat();
        assert!(h.stalled(Duration::from_millis(10)).is_none());
        h.work_started();
        tokio::time::advance(step).await;
        h.beat();
        assert!(
            h.stalled(Duration::from_millis(10)).is_some(),
            "work without progress"
        );
        h.work_done();
        assert!(h.stalled(Duration::from_millis(10)).is_none());
    }
}
