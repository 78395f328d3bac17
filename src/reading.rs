//! The wire format of a weather reading, and its validation.
//!
//! ```json
//! {"station_id": "STATION-001", "temperature": 21.37, "humidity": 55.02, "pressure": 1012.33,
//!  "message_id": "0193…", "measured_at": "2026-11-27T21:00:00.123Z"}
//! ```
//! `message_id` and `measured_at` are optional: the older Python producer sent only the first four.
//! Unknown fields are ignored.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

/// Plausible surface values; anything outside is a broken sensor or a broken message.
pub const TEMPERATURE_RANGE: (f64, f64) = (-90.0, 60.0);
pub const HUMIDITY_RANGE: (f64, f64) = (0.0, 100.0);
pub const PRESSURE_RANGE: (f64, f64) = (850.0, 1100.0);
pub const MAX_STATION_ID_CHARS: usize = 64;

/// Namespace for ids derived from message content when a message carries none (older clients):
/// the same bytes always get the same id, so a redelivery is still recognised as a duplicate.
const CONTENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d2c_4d1e_8f3a_4b7e_9a51_0c3e_57a1_e9b2);

/// A valid reading, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub message_id: Uuid,
    pub station_id: String,
    pub temperature: f64,
    pub humidity: f64,
    pub pressure: f64,
    pub measured_at: Option<OffsetDateTime>,
}

/// Why a message was dead-lettered. A closed set: it is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    Empty,
    TooLarge,
    NotUtf8,
    MalformedJson,
    NotObject,
    MissingField,
    WrongType,
    NonFinite,
    OutOfRange,
    InvalidStationId,
    InvalidMessageId,
    InvalidTimestamp,
    /// Valid here, but PostgreSQL refused the row (a constraint added by the operator, say).
    DatabaseRejected,
}

impl RejectReason {
    pub const ALL: [RejectReason; 13] = [
        Self::Empty,
        Self::TooLarge,
        Self::NotUtf8,
        Self::MalformedJson,
        Self::NotObject,
        Self::MissingField,
        Self::WrongType,
        Self::NonFinite,
        Self::OutOfRange,
        Self::InvalidStationId,
        Self::InvalidMessageId,
        Self::InvalidTimestamp,
        Self::DatabaseRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLarge => "too_large",
            Self::NotUtf8 => "not_utf8",
            Self::MalformedJson => "malformed_json",
            Self::NotObject => "not_object",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::NonFinite => "non_finite",
            Self::OutOfRange => "out_of_range",
            Self::InvalidStationId => "invalid_station_id",
            Self::InvalidMessageId => "invalid_message_id",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::DatabaseRejected => "database_rejected",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected message: the reason (for metrics) and a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    station_id: Option<Field<'a>>,
    #[serde(borrow)]
    temperature: Option<Field<'a>>,
    #[serde(borrow)]
    humidity: Option<Field<'a>>,
    #[serde(borrow)]
    pressure: Option<Field<'a>>,
    #[serde(borrow)]
    message_id: Option<Field<'a>>,
    #[serde(borrow)]
    measured_at: Option<Field<'a>>,
}

/// One field's JSON value, as much of it as validation needs: a string borrowed from the body
/// (copied only when it has escapes), a number, or just the kind of anything else. Parsed exactly
/// as `serde_json::Value` would be (nested arrays and objects too, so the same nesting limit
/// applies), so every message gets the same rejection reason, without building a tree per body.
enum Field<'a> {
    Null,
    Bool,
    Number(f64),
    Str(Cow<'a, str>),
    Array,
    Object,
}

impl Field<'_> {
    /// What it is, for a rejection's detail.
    fn kind(&self) -> &'static str {
        match self {
            Field::Null => "null",
            Field::Bool => "a boolean",
            Field::Number(_) => "a number",
            Field::Str(_) => "a string",
            Field::Array => "an array",
            Field::Object => "an object",
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Field<'de>, E> {
        Ok(Field::Bool)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Field<'de>, E> {
        Ok(Field::Number(v as f64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Field<'de>, E> {
        Ok(Field::Number(v as f64))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Field<'de>, E> {
        Ok(Field::Number(v))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'de>, A::Error> {
        while seq.next_element::<Field<'de>>()?.is_some() {}
        Ok(Field::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, Field<'de>>()?.is_some() {}
        Ok(Field::Object)
    }
}

/// What our producer sends.
#[derive(Serialize)]
pub struct OutgoingReading<'a> {
    pub station_id: &'a str,
    pub temperature: f64,
    pub humidity: f64,
    pub pressure: f64,
    pub message_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub measured_at: OffsetDateTime,
}

fn required<'f, 'a>(
    field: &'static str,
    v: &'f Option<Field<'a>>,
) -> Result<&'f Field<'a>, Rejection> {
    v.as_ref().ok_or_else(|| {
        Rejection::new(
            RejectReason::MissingField,
            format!("field `{field}` is missing or null"),
        )
    })
}

fn number(field: &'static str, v: &Option<Field>, range: (f64, f64)) -> Result<f64, Rejection> {
    let n = match required(field, v)? {
        Field::Number(n) => *n,
        other => {
            return Err(Rejection::new(
                RejectReason::WrongType,
                format!("field `{field}` must be a number, found {}", other.kind()),
            ))
        }
    };
    if !n.is_finite() {
        return Err(Rejection::new(
            RejectReason::NonFinite,
            format!("field `{field}` is not finite"),
        ));
    }
    if n < range.0 || n > range.1 {
        return Err(Rejection::new(
            RejectReason::OutOfRange,
            format!(
                "field `{field}` = {n} is outside [{}, {}]",
                range.0, range.1
            ),
        ));
    }
    Ok(n)
}

fn string<'f>(field: &'static str, v: &'f Field) -> Result<&'f str, Rejection> {
    match v {
        Field::Str(s) => Ok(s),
        other => Err(Rejection::new(
            RejectReason::WrongType,
            format!("field `{field}` must be a string, found {}", other.kind()),
        )),
    }
}

/// Whether `c` may be in a station id: a letter (Unicode categories L*) or decimal digit (Nd) of
/// any script, or printable ASCII (space and punctuation). Nothing invisible (the Hangul fillers
/// are letters that print as nothing), no control, no direction override, no line or paragraph
/// separator, no combining mark, no symbol. With [`station_id`]'s NFKC check, two ids that print
/// alike are equal byte for byte, except for letters of different scripts that look alike
/// (Latin `a`, Cyrillic `а`), which no rule short of ASCII-only can tell apart.
pub fn station_id_char(c: char) -> bool {
    use unicode_general_category::{get_general_category, GeneralCategory as G};
    if (' '..='~').contains(&c) {
        return true;
    }
    let invisible_letter = matches!(c, '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}');
    let letter_or_digit = matches!(
        get_general_category(c),
        G::UppercaseLetter
            | G::LowercaseLetter
            | G::TitlecaseLetter
            | G::ModifierLetter
            | G::OtherLetter
            | G::DecimalNumber
    );
    letter_or_digit && !invisible_letter
}

fn station_id(v: &Option<Field>) -> Result<String, Rejection> {
    let s = string("station_id", required("station_id", v)?)?;
    let chars = s.chars().count();
    let invalid = |what: String| Rejection::new(RejectReason::InvalidStationId, what);
    if s.trim().is_empty() || chars > MAX_STATION_ID_CHARS {
        return Err(invalid(format!(
            "field `station_id` must be 1 to {MAX_STATION_ID_CHARS} characters, not all spaces; found {chars}"
        )));
    }
    if let Some(c) = s.chars().find(|&c| !station_id_char(c)) {
        return Err(invalid(format!(
            "field `station_id` may hold only letters, digits and printable ASCII; found U+{:04X}",
            c as u32
        )));
    }
    if s.trim() != s {
        return Err(invalid(
            "field `station_id` must not begin or end with a space".into(),
        ));
    }
    // Compatibility forms (fullwidth `Ｓ`, the Kelvin sign, `Ⅰ`) print like the letters they
    // stand for: only the normalised form (NFKC) is accepted.
    if !unicode_normalization::is_nfkc(s) {
        return Err(invalid(
            "field `station_id` must be in Unicode normal form NFKC (no fullwidth or compatibility characters)".into(),
        ));
    }
    Ok(s.to_owned())
}

/// Earliest and latest `measured_at` accepted, in UTC: years 1 to 9999, which PostgreSQL's
/// `timestamptz` (4713 BC to 294276 AD) and the `time` crate both hold whatever the offset.
pub const MEASURED_AT_YEARS: (i32, i32) = (1, 9999);

/// An RFC 3339 timestamp, converted to UTC. The conversion is checked: `9999-12-31T23:59:59-01:00`
/// is a valid RFC 3339 string whose UTC instant is in year 10000, which `time` cannot represent
/// (and which made postgres-types panic when it converted the value itself).
fn timestamp(s: &str) -> Result<OffsetDateTime, Rejection> {
    let invalid = |what: String| Rejection::new(RejectReason::InvalidTimestamp, what);
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        invalid(format!(
            "field `measured_at` is not an RFC 3339 timestamp: {e}"
        ))
    })?;
    let (first, last) = MEASURED_AT_YEARS;
    match t.checked_to_offset(time::UtcOffset::UTC) {
        Some(utc) if (first..=last).contains(&utc.year()) => Ok(utc),
        _ => Err(invalid(format!(
            "field `measured_at` is outside the years {first} to {last} in UTC"
        ))),
    }
}

fn classify_json_error(body: &str, e: &serde_json::Error) -> Rejection {
    let text = e.to_string();
    if text.contains("number out of range") {
        return Rejection::new(
            RejectReason::NonFinite,
            format!("a number is not finite: {e}"),
        );
    }
    if e.is_data() && !body.trim_start().starts_with('{') {
        return Rejection::new(RejectReason::NotObject, "the message is not a JSON object");
    }
    Rejection::new(RejectReason::MalformedJson, format!("not valid JSON: {e}"))
}

/// Checks one message body. `property_id` is the AMQP `message-id` property, if any.
pub fn decode(
    body: &[u8],
    property_id: Option<&str>,
    max_bytes: usize,
) -> Result<Reading, Rejection> {
    if body.is_empty() {
        return Err(Rejection::new(
            RejectReason::Empty,
            "the message body is empty",
        ));
    }
    if body.len() > max_bytes {
        return Err(Rejection::new(
            RejectReason::TooLarge,
            format!(
                "the body has {} bytes, more than the limit of {max_bytes}",
                body.len()
            ),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        Rejection::new(RejectReason::NotUtf8, format!("the body is not UTF-8: {e}"))
    })?;
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| classify_json_error(text, &e))?;

    let station_id = station_id(&wire.station_id)?;
    let temperature = number("temperature", &wire.temperature, TEMPERATURE_RANGE)?;
    let humidity = number("humidity", &wire.humidity, HUMIDITY_RANGE)?;
    let pressure = number("pressure", &wire.pressure, PRESSURE_RANGE)?;
    let body_id = match &wire.message_id {
        None => None,
        Some(v) => Some(Uuid::parse_str(string("message_id", v)?).map_err(|e| {
            Rejection::new(
                RejectReason::InvalidMessageId,
                format!("field `message_id` is not a UUID: {e}"),
            )
        })?),
    };
    let measured_at = match &wire.measured_at {
        None => None,
        Some(v) => Some(timestamp(string("measured_at", v)?)?),
    };
    let reading = Reading {
        message_id: message_id(body_id, property_id, body),
        station_id,
        temperature,
        humidity,
        pressure,
        measured_at,
    };
    storable(&reading)?;
    Ok(reading)
}

/// Whether the insert can encode `r`; the checks above should make this always so, and this
/// makes sure: a reading that cannot be encoded is rejected here, naming its field, instead of
/// failing (or, as a year-10000 timestamp once did, panicking) on its way to PostgreSQL.
fn storable(r: &Reading) -> Result<(), Rejection> {
    let mut buf = bytes::BytesMut::new();
    crate::db::encode(r, &mut buf).map_err(|(column, e)| {
        let reason = match column {
            "message_id" => RejectReason::InvalidMessageId,
            "station_id" => RejectReason::InvalidStationId,
            "measured_at" => RejectReason::InvalidTimestamp,
            _ => RejectReason::OutOfRange,
        };
        Rejection::new(reason, format!("field `{column}` cannot be stored: {e}"))
    })
}

/// The id a reading is stored under: the body's `message_id`, else the AMQP `message-id` property
/// (parsed as a UUID, or hashed into one), else a hash of the body. Redeliveries keep their id.
pub fn message_id(body_id: Option<Uuid>, property_id: Option<&str>, body: &[u8]) -> Uuid {
    if let Some(id) = body_id {
        return id;
    }
    match property_id.filter(|p| !p.is_empty()) {
        Some(p) => {
            Uuid::parse_str(p).unwrap_or_else(|_| Uuid::new_v5(&CONTENT_ID_NAMESPACE, p.as_bytes()))
        }
        None => Uuid::new_v5(&CONTENT_ID_NAMESPACE, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"station_id": "STATION-001", "temperature": 21.37, "humidity": 55.02, "pressure": 1012.33}"#;

    fn reason(body: &[u8]) -> RejectReason {
        decode(body, None, 4096).unwrap_err().reason
    }

    #[test]
    fn accepts_the_old_four_field_form() {
        let r = decode(OK.as_bytes(), None, 4096).unwrap();
        assert_eq!(r.station_id, "STATION-001");
        assert_eq!(r.temperature, 21.37);
        assert_eq!(r.measured_at, None);
        // Same bytes, same id: a redelivery is a duplicate.
        assert_eq!(
            r.message_id,
            decode(OK.as_bytes(), None, 4096).unwrap().message_id
        );
    }

    #[test]
    fn accepts_our_form_and_prefers_the_body_id() {
        let id = Uuid::now_v7();
        let body = format!(
            r#"{{"station_id":"S","temperature":-5,"humidity":0,"pressure":1100,"message_id":"{id}","measured_at":"2026-11-27T21:00:00.5Z","extra":[1]}}"#
        );
        let r = decode(body.as_bytes(), Some("other"), 4096).unwrap();
        assert_eq!(r.message_id, id);
        assert_eq!(r.measured_at.unwrap().unix_timestamp(), 1_795_813_200);
    }

    #[test]
    fn property_id_is_used_when_the_body_has_none() {
        let id = Uuid::now_v7();
        let r = decode(OK.as_bytes(), Some(&id.to_string()), 4096).unwrap();
        assert_eq!(r.message_id, id);
        let a = decode(OK.as_bytes(), Some("legacy-42"), 4096)
            .unwrap()
            .message_id;
        let b = decode(OK.as_bytes(), Some("legacy-43"), 4096)
            .unwrap()
            .message_id;
        assert_ne!(a, b);
    }

    #[test]
    fn every_kind_of_bad_input_has_its_reason() {
        use RejectReason::*;
        let cases: &[(&[u8], RejectReason)] = &[
            (b"", Empty),
            (&[b' '; 5000], TooLarge),
            (b"\xff\xfe{}", NotUtf8),
            (b"{\"station_id\": ", MalformedJson),
            (b"not json", MalformedJson),
            (b"[1,2]", NotObject),
            (b"42", NotObject),
            (b"\"str\"", NotObject),
            (br#"{"temperature":1,"humidity":1,"pressure":1000}"#, MissingField),
            (br#"{"station_id":null,"temperature":1,"humidity":1,"pressure":1000}"#, MissingField),
            (br#"{"station_id":"S","humidity":1,"pressure":1000}"#, MissingField),
            (br#"{"station_id":7,"temperature":1,"humidity":1,"pressure":1000}"#, WrongType),
            (br#"{"station_id":"S","temperature":"21","humidity":1,"pressure":1000}"#, WrongType),
            (br#"{"station_id":"S","temperature":1e999,"humidity":1,"pressure":1000}"#, NonFinite),
            (br#"{"station_id":"S","temperature":NaN,"humidity":1,"pressure":1000}"#, MalformedJson),
            (br#"{"station_id":"S","temperature":61,"humidity":1,"pressure":1000}"#, OutOfRange),
            (br#"{"station_id":"S","temperature":1,"humidity":100.5,"pressure":1000}"#, OutOfRange),
            (br#"{"station_id":"S","temperature":1,"humidity":1,"pressure":0}"#, OutOfRange),
            (br#"{"station_id":"  ","temperature":1,"humidity":1,"pressure":1000}"#, InvalidStationId),
            (br#"{"station_id":"a\u0000b","temperature":1,"humidity":1,"pressure":1000}"#, InvalidStationId),
            (br#"{"station_id":"S","temperature":1,"humidity":1,"pressure":1000,"message_id":"x"}"#, InvalidMessageId),
            (br#"{"station_id":"S","temperature":1,"humidity":1,"pressure":1000,"message_id":5}"#, WrongType),
            (br#"{"station_id":"S","temperature":1,"humidity":1,"pressure":1000,"measured_at":"yesterday"}"#, InvalidTimestamp),
            (br#"{"station_id":"S","temperature":1,"humidity":1,"pressure":1000,"measured_at":"9999-12-31T23:59:59-01:00"}"#, InvalidTimestamp),
            (br#"{"station_id":"S","temperature":1,"humidity":1,"pressure":1000,"measured_at":"0001-01-01T00:00:00+00:01"}"#, InvalidTimestamp),
            (br#"{"station_id":"S","temperature":1,"humidity":1,"pressure":1000,"measured_at":"0000-12-31T23:59:59Z"}"#, InvalidTimestamp),
        ];
        for (body, want) in cases {
            assert_eq!(reason(body), *want, "{}", String::from_utf8_lossy(body));
        }
        let long = format!(
            r#"{{"station_id":"{}","temperature":1,"humidity":1,"pressure":1000}}"#,
            "x".repeat(65)
        );
        assert_eq!(reason(long.as_bytes()), InvalidStationId);
    }

    /// Both ends of every field's domain, and just past them: what is accepted must encode.
    #[test]
    fn edges_of_every_field_are_accepted_or_rejected_never_unstorable() {
        use RejectReason::*;
        let body = |station: &str, t: &str, h: &str, p: &str, at: &str| {
            format!(
                r#"{{"station_id":{station},"temperature":{t},"humidity":{h},"pressure":{p},"measured_at":"{at}"}}"#
            )
        };
        let ok = |b: String| match decode(b.as_bytes(), None, 4096) {
            Ok(r) => {
                let mut buf = bytes::BytesMut::new();
                crate::db::encode(&r, &mut buf).unwrap();
                r
            }
            Err(e) => panic!("{b}: {e:?}"),
        };
        let bad = |b: String, want: RejectReason| {
            assert_eq!(
                decode(b.as_bytes(), None, 4096).unwrap_err().reason,
                want,
                "{b}"
            );
        };
        let at = "2026-01-01T00:00:00Z";
        for (t, h, p) in [
            ("-90", "0", "850"),
            ("60", "100", "1100"),
            ("-0.0", "-0.0", "1e3"),
            ("5e-324", "2.2250738585072014e-308", "1099.9999999999998"),
            ("-90.0", "100.0", "850.0"),
        ] {
            ok(body("\"S\"", t, h, p, at));
        }
        bad(
            body("\"S\"", "-90.00000000000001", "0", "1000", at),
            OutOfRange,
        );
        bad(
            body("\"S\"", "60.00000000000001", "0", "1000", at),
            OutOfRange,
        );
        bad(body("\"S\"", "1", "-5e-324", "1000", at), OutOfRange);
        bad(
            body("\"S\"", "1", "100.00000000000003", "1000", at),
            OutOfRange,
        );
        bad(body("\"S\"", "1", "1", "849.9999999999999", at), OutOfRange);
        bad(
            body("\"S\"", "1", "1", "1100.0000000000002", at),
            OutOfRange,
        );
        for at in [
            "0001-01-01T00:00:00Z",
            "0001-01-01T00:00:00-23:59",
            "9999-12-31T23:59:59.999999999Z",
            "9999-12-31T23:59:59+23:59",
            "2016-12-31T23:59:60Z",
            "1970-01-01T00:00:00.000000001+00:00",
            "2026-06-30T12:00:00.5-00:00",
        ] {
            let r = ok(body("\"S\"", "1", "1", "1000", at));
            assert_eq!(
                r.measured_at.unwrap().offset(),
                time::UtcOffset::UTC,
                "{at}"
            );
        }
        for at in [
            "9999-12-31T23:59:59-01:00",
            "9999-12-31T23:59:59.999999999-00:01",
            "0001-01-01T00:00:00+00:01",
            "0000-01-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00+24:00",
        ] {
            bad(body("\"S\"", "1", "1", "1000", at), InvalidTimestamp);
        }
        let long = "é".repeat(MAX_STATION_ID_CHARS);
        for station in [
            "\"ÅØ-東京-٣\"",
            "\"x\"",
            "\"Station 7 (roof) #2/a:b\"",
            &format!("\"{long}\""),
        ] {
            ok(body(station, "1", "1", "1000", at));
        }
        bad(
            body(&format!("\"{long}x\""), "1", "1", "1000", at),
            InvalidStationId,
        );
        // Look-alikes: invisible, direction-changing, separators, combining marks, symbols,
        // spaces that are not U+0020, and padding.
        for c in [
            "\\u200b", "\\u200d", "\\u202e", "\\u2066", "\\u2028", "\\u2029", "\\ufeff", "\\u0301",
            "\\u00a0", "\\u3000", "\\u00ad", "🌧", "\\ue000", "\\u3164", "\\u115f", "\\u0345",
            "\\u0e31", "\\u212a", "\\uff33", "\\u2160", "\\u061c", "\\u180e",
        ] {
            bad(
                body(&format!("\"S-1{c}\""), "1", "1", "1000", at),
                InvalidStationId,
            );
        }
        for padded in ["\" S-1\"", "\"S-1 \""] {
            bad(body(padded, "1", "1", "1000", at), InvalidStationId);
        }
    }

    #[test]
    fn details_name_the_field() {
        let e = decode(
            br#"{"station_id":"S","temperature":61,"humidity":1,"pressure":1000}"#,
            None,
            4096,
        )
        .unwrap_err();
        assert!(e.detail.contains("temperature"), "{}", e.detail);
    }

    #[test]
    fn reason_labels_are_unique() {
        let mut names: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RejectReason::ALL.len());
    }
}
