//! What the daemon is doing, shared between its loops and whoever reports it (sd-notify STATUS,
//! readiness, the watchdog). Loops call [`Health::beat`] on every iteration, so a loop that stops
//! iterating shows up as a stale heartbeat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    WaitingForDatabase,
    WaitingForBroker,
    Running,
    Stopping,
}

#[derive(Debug)]
pub struct Health {
    started: Instant,
    phase: watch::Sender<Phase>,
    heartbeat_ms: AtomicU64,
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

    /// The loop made progress, or waited healthily (an idle tick, a retry).
    pub fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
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
