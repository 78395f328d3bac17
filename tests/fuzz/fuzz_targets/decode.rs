//! The consumer's whole path for one message body short of the network: decoding, validation and
//! the encoding of every parameter the insert sends. It must never panic, and whatever `decode`
//! accepts must encode: a reading within the documented ranges, a UTC timestamp PostgreSQL can
//! hold, or a rejection with one of the known reasons and a detail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sistema_mensajes::{db, reading::{self, RejectReason}};

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
            if let Some(at) = r.measured_at {
                assert!(at.offset().is_utc());
                let (first, last) = reading::MEASURED_AT_YEARS;
                assert!((first..=last).contains(&at.year()));
            }
            let mut buf = bytes::BytesMut::new();
            db::encode(&r, &mut buf).unwrap();
        }
        Err(rejection) => {
            assert!(RejectReason::ALL.contains(&rejection.reason));
            assert!(!rejection.detail.is_empty());
        }
    }
});
