//! Simulated weather stations: each value takes a bounded random walk, so consecutive readings of
//! a station look like weather rather than noise.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::reading::OutgoingReading;

/// Bounds of the walk (well inside the consumer's plausible ranges) and the largest step.
const TEMPERATURE: Walk = Walk {
    min: -20.0,
    max: 40.0,
    step: 0.3,
};
const HUMIDITY: Walk = Walk {
    min: 10.0,
    max: 100.0,
    step: 1.0,
};
const PRESSURE: Walk = Walk {
    min: 960.0,
    max: 1045.0,
    step: 0.5,
};

struct Walk {
    min: f64,
    max: f64,
    step: f64,
}

impl Walk {
    /// One step, reflected at the bounds, rounded to hundredths like the older system's values.
    fn next(&self, value: f64, rng: &mut impl Rng) -> f64 {
        let mut v = value + rng.random_range(-self.step..=self.step);
        if v > self.max {
            v = 2.0 * self.max - v;
        }
        if v < self.min {
            v = 2.0 * self.min - v;
        }
        (v.clamp(self.min, self.max) * 100.0).round() / 100.0
    }
}

#[derive(Debug, Clone)]
pub struct Station {
    pub id: String,
    pub temperature: f64,
    pub humidity: f64,
    pub pressure: f64,
}

/// A set of stations read in turn.
pub struct Stations {
    stations: Vec<Station>,
    next: usize,
    rng: StdRng,
}

impl Stations {
    /// `count` stations named `STATION-001`… with plausible starting values.
    pub fn new(count: u32) -> Self {
        let mut rng = StdRng::from_os_rng();
        let stations = (1..=count)
            .map(|n| Station {
                id: format!("STATION-{n:03}"),
                temperature: rng.random_range(5.0..25.0),
                humidity: rng.random_range(40.0..80.0),
                pressure: rng.random_range(1000.0..1020.0),
            })
            .collect();
        Self {
            stations,
            next: 0,
            rng,
        }
    }

    /// The next station's new reading, as JSON bytes, with its id.
    pub fn sample(&mut self) -> (Uuid, Vec<u8>) {
        let n = self.stations.len();
        let s = &mut self.stations[self.next % n];
        self.next = (self.next + 1) % n;
        s.temperature = TEMPERATURE.next(s.temperature, &mut self.rng);
        s.humidity = HUMIDITY.next(s.humidity, &mut self.rng);
        s.pressure = PRESSURE.next(s.pressure, &mut self.rng);
        let id = Uuid::now_v7();
        let reading = OutgoingReading {
            station_id: &s.id,
            temperature: s.temperature,
            humidity: s.humidity,
            pressure: s.pressure,
            message_id: id,
            measured_at: OffsetDateTime::now_utc(),
        };
        // Serialising a struct of strings and finite floats into a Vec cannot fail.
        (id, serde_json::to_vec(&reading).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::decode;

    #[test]
    fn readings_walk_within_bounds_and_pass_validation() {
        let mut s = Stations::new(2);
        let mut last: Option<f64> = None;
        for i in 0..20_000 {
            let (id, body) = s.sample();
            let r = decode(&body, None, 4096).unwrap();
            assert_eq!(r.message_id, id);
            assert!(r.measured_at.is_some());
            if i % 2 == 0 {
                assert_eq!(r.station_id, "STATION-001");
                if let Some(prev) = last {
                    assert!(
                        (r.temperature - prev).abs() <= 0.31,
                        "{prev} -> {}",
                        r.temperature
                    );
                }
                last = Some(r.temperature);
            }
            assert!((-20.0..=40.0).contains(&r.temperature));
            assert!((10.0..=100.0).contains(&r.humidity));
            assert!((960.0..=1045.0).contains(&r.pressure));
        }
    }
}
