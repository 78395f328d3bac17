//! Logging: journald (native protocol, structured fields) under systemd, text or JSON on stderr
//! elsewhere; and a limiter for log lines that could repeat once per message.

use std::time::{Duration, Instant};

use tracing_subscriber::field::MakeExt;
use tracing_subscriber::filter::{FilterExt, Targets};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{LogConfig, LogFormat};

/// Where logs went, for the first log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Journald,
    Stderr,
}

/// `journald` for `auto` when systemd connected stderr to the journal (`JOURNAL_STREAM`) or the
/// journal socket exists; the caller falls back to stderr if it cannot be opened.
fn wants_journald(format: LogFormat) -> bool {
    match format {
        LogFormat::Journald => true,
        LogFormat::Text | LogFormat::Json => false,
        LogFormat::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    }
}

/// What no level or `RUST_LOG` lets through. At TRACE, lapin and amq-protocol log every frame,
/// the login frame included, as a byte array that holds the broker password; and lapin logs each
/// returned message at WARN with its whole body, which one unroutable burst turns into a flood
/// (the producer logs returns itself, rate-limited).
fn allowed(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    let frames = target.starts_with("lapin") || target.starts_with("amq_protocol");
    !(target.starts_with("lapin::returned_messages")
        || frames && *meta.level() == tracing::Level::TRACE)
}

/// Installs the global subscriber. `RUST_LOG` overrides `log.level`. `identifier` is the
/// SYSLOG_IDENTIFIER in the journal (`producer` or `consumer`).
pub fn init(
    cfg: &LogConfig,
    identifier: &str,
) -> Result<(LogTarget, Option<String>), tracing_subscriber::util::TryInitError> {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<Targets>().ok())
        .or_else(|| cfg.level.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
        .and(tracing_subscriber::filter::filter_fn(allowed));
    let mut fallback_reason = None;
    if wants_journald(cfg.format) {
        match tracing_journald::layer() {
            Ok(layer) => {
                // Fields go in as themselves (BATCH_SIZE, ERROR_TYPE, REASON, READING_ID), so an
                // operator can filter on them: `journalctl -u consumer REASON=out_of_range`.
                let layer = layer
                    .with_syslog_identifier(identifier.to_owned())
                    .with_field_prefix(None);
                tracing_subscriber::registry()
                    .with(layer.with_filter(filter))
                    .try_init()?;
                return Ok((LogTarget::Journald, None));
            }
            Err(e) => {
                fallback_reason = Some(format!(
                    "journald is not available ({e}); logging to stderr"
                ))
            }
        }
    }
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = if cfg.format == LogFormat::Json {
        stderr.json().boxed()
    } else {
        stderr.with_ansi(false).fmt_fields(escaped_fields()).boxed()
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init()?;
    Ok((LogTarget::Stderr, fallback_reason))
}

/// The text format's fields, each written as `name=value` (the message bare) with every
/// character that could forge a log line or hide text escaped as `\u{..}`: a message's `detail`
/// or a station id is the sender's text, and a raw newline, ESC or bidi override in it would start
/// a fake line, recolour the terminal, or reverse what follows. (JSON escapes its own controls;
/// journald keeps each field apart.)
fn escaped_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let raw = format!("{value:?}");
        let text = escape_unprintable(&raw);
        match field.name() {
            // Our own text; a `str` records through `Debug`, which quotes it.
            "message" => {
                let bare = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'));
                write!(w, "{}", bare.unwrap_or(&text))
            }
            name => write!(w, "{name}={text}"),
        }
    })
    .delimited(" ")
}

/// Characters that do not print as themselves, by Unicode category: controls (Cc: newline, ESC,
/// C1), format characters (Cf: zero-width, bidi marks, overrides and isolates, tags, soft hyphen),
/// private use, surrogates and unassigned (Co, Cs, Cn), line and paragraph separators (Zl, Zp),
/// spaces other than U+0020 (Zs), variation selectors and other invisible marks, and the Hangul
/// fillers (letters that print as nothing).
pub fn is_unprintable(c: char) -> bool {
    use unicode_general_category::{get_general_category, GeneralCategory as G};
    match get_general_category(c) {
        G::Control
        | G::Format
        | G::PrivateUse
        | G::Surrogate
        | G::Unassigned
        | G::LineSeparator
        | G::ParagraphSeparator => true,
        G::SpaceSeparator => c != ' ',
        _ => matches!(
            c,
            '\u{034F}' | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{180B}'..='\u{180F}'
                | '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}'
        ),
    }
}

fn escape_unprintable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(is_unprintable) {
        return s.into();
    }
    s.chars()
        .map(|c| match is_unprintable(c) {
            true => format!("\\u{{{:x}}}", c as u32),
            false => c.to_string(),
        })
        .collect::<String>()
        .into()
}

/// Lets through at most `burst` events per `window`, and counts the rest, so one bad message per
/// delivery cannot flood the journal.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` if this event may be logged, `n` being how many were suppressed before it;
    /// `None` if it must be dropped.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= self.window {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_logs_escape_what_could_forge_a_line_or_hide_text() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .map_err(|_| std::io::ErrorKind::Other)?
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(escaped_fields());
        let sender = "x\n2026-01-01T00:00:00Z ERROR forged\u{1b}[31m\u{202e}dier\u{2028}\u{200b}\u{61c}\u{e0041}\u{3164}\u{85}";
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            tracing::warn!(message = "Rejected.", detail = %sender, station = sender, n = 3);
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(!out.trim_end().chars().any(is_unprintable), "{out:?}");
        assert!(out.contains(" Rejected. detail=x\\u{a}2026"), "{out}");
        assert!(out.contains(" station=\"x\\n2026"), "{out}");
        assert!(
            out.contains(
                "\\u{1b}[31m\\u{202e}dier\\u{2028}\\u{200b}\\u{61c}\\u{e0041}\\u{3164}\\u{85}"
            ),
            "{out}"
        );
        assert!(out.contains(" n=3"), "{out}");
    }

    #[test]
    fn limiter_allows_a_burst_per_window_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(2, Duration::from_secs(1));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(500)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(2));
    }
}
