//! Which stations have been heard from, and which have fallen silent: a station that stops
//! reporting is the first thing a user of weather readings asks about. One entry per station,
//! bounded: an id a sender makes up costs at most one entry, and past `max` the station heard
//! from longest ago is forgotten.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Stations {
    last_seen: HashMap<String, Instant>,
    silent_after: Duration,
    max: usize,
    forgotten: u64,
}

impl Stations {
    pub fn new(silent_after: Duration, max: usize) -> Self {
        Self {
            last_seen: HashMap::new(),
            silent_after,
            max: max.max(1),
            forgotten: 0,
        }
    }

    /// `station` stored a reading at `now`.
    pub fn seen(&mut self, station: &str, now: Instant) {
        if let Some(at) = self.last_seen.get_mut(station) {
            *at = now;
            return;
        }
        if self.last_seen.len() >= self.max {
            let oldest = self
                .last_seen
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(s, _)| s.clone());
            if let Some(oldest) = oldest {
                self.last_seen.remove(&oldest);
                self.forgotten += 1;
            }
        }
        self.last_seen.insert(station.to_owned(), now);
    }

    /// Stations heard from since this process started.
    pub fn known(&self) -> usize {
        self.last_seen.len()
    }

    /// Of those, how many have not been heard from for `silent_after` at `now`.
    pub fn silent(&self, now: Instant) -> usize {
        self.last_seen
            .values()
            .filter(|at| now.saturating_duration_since(**at) >= self.silent_after)
            .count()
    }

    /// Stations forgotten because `max` were known.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_stations_are_counted_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut s = Stations::new(Duration::from_secs(60), 3);
        s.seen("A", t0);
        s.seen("B", t0 + Duration::from_secs(30));
        s.seen("C", t0 + Duration::from_secs(50));
        assert_eq!((s.known(), s.silent(t0 + Duration::from_secs(59))), (3, 0));
        assert_eq!(s.silent(t0 + Duration::from_secs(60)), 1);
        s.seen("A", t0 + Duration::from_secs(70));
        assert_eq!(s.silent(t0 + Duration::from_secs(95)), 1); // B
                                                               // A fourth station replaces the one heard from longest ago (B).
        s.seen("D", t0 + Duration::from_secs(96));
        assert_eq!((s.known(), s.forgotten()), (3, 1));
        assert_eq!(s.silent(t0 + Duration::from_secs(100)), 0);
    }
}
