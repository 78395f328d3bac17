//! What the producer publishes, and when: the readings of its mode, released at the configured
//! rate.

use std::time::Instant;

use uuid::Uuid;

use crate::station::Stations;

use super::Mode;

/// A reading on its way to the broker, kept until its positive confirm.
pub(super) struct Outgoing {
    pub id: String,
    pub body: Vec<u8>,
    pub published_before: bool,
    /// Counted in `producer_messages_confirmed_total` already: its confirm came before its
    /// return (see [`super::inflight`]), and the counter cannot go back.
    pub counted: bool,
}

/// The readings of a [`Mode`], made as they are asked for.
pub(super) enum Source {
    Stations {
        stations: Box<Stations>,
        remaining: Option<u64>,
    },
    One(Option<Vec<u8>>),
}

impl Source {
    pub fn new(mode: Mode, stations: u32) -> Self {
        match mode {
            Mode::Simulate => Source::Stations {
                stations: Box::new(Stations::new(stations)),
                remaining: None,
            },
            Mode::Count(n) => Source::Stations {
                stations: Box::new(Stations::new(stations)),
                remaining: Some(n),
            },
            Mode::Send(body) => Source::One(Some(body)),
        }
    }

    /// Whether the configured rate applies: a hand-written message goes at once.
    pub fn paced(&self) -> bool {
        matches!(self, Source::Stations { .. })
    }

    pub fn next(&mut self) -> Option<Outgoing> {
        match self {
            Source::Stations {
                stations,
                remaining,
            } => {
                if let Some(r) = remaining {
                    if *r == 0 {
                        return None;
                    }
                    *r -= 1;
                }
                let (id, body) = stations.sample();
                Some(Outgoing {
                    id: id.to_string(),
                    body,
                    published_before: false,
                    counted: false,
                })
            }
            Source::One(body) => body.take().map(|body| Outgoing {
                id: Uuid::now_v7().to_string(),
                body,
                published_before: false,
                counted: false,
            }),
        }
    }

    pub fn exhausted(&self) -> bool {
        self.unsent() == 0
            && !matches!(
                self,
                Source::Stations {
                    remaining: None,
                    ..
                }
            )
    }

    /// Readings still to send (0 for an endless simulation).
    pub fn unsent(&self) -> u64 {
        match self {
            Source::Stations { remaining, .. } => remaining.unwrap_or(0),
            Source::One(body) => u64::from(body.is_some()),
        }
    }
}

/// Releases readings at a steady rate; never more than `burst` at once after a stall.
pub(super) struct Pacer {
    rate: Option<f64>,
    start: Instant,
    released: u64,
}

impl Pacer {
    pub fn new(rate: Option<f64>) -> Self {
        Self {
            rate,
            start: Instant::now(),
            released: 0,
        }
    }

    /// How many readings are due now, at most `room`.
    pub fn due(&mut self, now: Instant, room: usize) -> usize {
        let Some(rate) = self.rate else { return room };
        let target = (now.duration_since(self.start).as_secs_f64() * rate) as u64;
        let owed = target.saturating_sub(self.released);
        if owed > room as u64 + 1 {
            // Sensors sample when they can: readings missed while stalled are skipped, not bunched.
            let skipped = owed - room as u64;
            self.released += skipped;
        }
        let due = target.saturating_sub(self.released).min(room as u64) as usize;
        self.released += due as u64;
        due
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn pacer_releases_at_the_rate_and_skips_after_a_stall() {
        let mut p = Pacer::new(Some(100.0));
        let t0 = p.start;
        assert_eq!(p.due(t0 + Duration::from_millis(50), 1000), 5);
        assert_eq!(p.due(t0 + Duration::from_millis(100), 1000), 5);
        // A 10 s stall with room for 3: three now, the rest skipped, no burst afterwards.
        assert_eq!(p.due(t0 + Duration::from_secs(10), 3), 3);
        assert_eq!(p.due(t0 + Duration::from_millis(10_010), 1000), 1);
        let mut unlimited = Pacer::new(None);
        assert_eq!(unlimited.due(Instant::now(), 7), 7);
    }
}
