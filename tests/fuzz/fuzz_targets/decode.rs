//! The consumer's decoding and validation must never panic: every input is either a reading
//! within the documented ranges, or a rejection with one of the known reasons and a detail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sistema_mensajes::reading::{self, RejectReason};

fuzz_target!(|data: &[u8]| {
    match reading::decode(data, None, 4096) {
        Ok(r) => {
            let within = |v: f64, (lo, hi): (f64, f64)| v.is_finite() && v >= lo && v <= hi;
            assert!(within(r.temperature, reading::TEMPERATURE_RANGE));
            assert!(within(r.humidity, reading::HUMIDITY_RANGE));
            assert!(within(r.pressure, reading::PRESSURE_RANGE));
            assert!(!r.station_id.trim().is_empty());
            assert!(r.station_id.chars().count() <= reading::MAX_STATION_ID_CHARS);
            assert!(!r.station_id.chars().any(char::is_control));
        }
        Err(rejection) => {
            assert!(RejectReason::ALL.contains(&rejection.reason));
            assert!(!rejection.detail.is_empty());
        }
    }
});
