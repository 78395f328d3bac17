//! The standard `process_*` metrics every Prometheus user expects from a daemon, read from
//! `/proc/self` at each scrape with procfs.
//!
//! Under systemd the units set `ProcSubset=pid`, which hides `/proc/stat` and so the boot time
//! other exporters add to the process start. The start time here is the start in clock ticks
//! since boot (`/proc/self/stat`) plus the boot time derived from `CLOCK_REALTIME` minus
//! `CLOCK_BOOTTIME`, neither of which needs `/proc`. A value that cannot be read is left out
//! of that scrape rather than exported as 0.

use std::time::{SystemTime, UNIX_EPOCH};

use procfs::process::{LimitValue, Process};
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge};

/// Unix time of the process start, in seconds; computed once.
#[derive(Debug, Clone, Copy)]
pub struct ProcessMetrics {
    start_time: f64,
}

impl Default for ProcessMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessMetrics {
    pub fn new() -> Self {
        let start_time = start_time_from_proc().unwrap_or_else(|| unix_now(SystemTime::now()));
        Self { start_time }
    }

    /// The `process_*` families, each present only if its source could be read.
    pub fn families(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let me = Process::myself().ok();
        let stat = me.as_ref().and_then(|p| p.stat().ok());
        let ticks = procfs::ticks_per_second() as f64;
        if let Some(stat) = &stat {
            if ticks > 0.0 {
                let cpu = (stat.utime + stat.stime) as f64 / ticks;
                out.extend(counter(
                    "process_cpu_seconds_total",
                    "Total user and system CPU time spent in seconds.",
                    cpu,
                ));
            }
            out.extend(gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                (stat.rss.saturating_mul(procfs::page_size())) as f64,
            ));
            out.extend(gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stat.vsize as f64,
            ));
        }
        if let Some(n) = me.as_ref().and_then(|p| p.fd_count().ok()) {
            out.extend(gauge(
                "process_open_fds",
                "Number of open file descriptors.",
                n as f64,
            ));
        }
        let max_fds = me.as_ref().and_then(|p| p.limits().ok()).and_then(|l| {
            match l.max_open_files.soft_limit {
                LimitValue::Value(v) => Some(v as f64),
                LimitValue::Unlimited => None,
            }
        });
        if let Some(max) = max_fds {
            out.extend(gauge(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max,
            ));
        }
        out.extend(gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.start_time,
        ));
        out
    }
}

fn unix_now(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Boot time from two clocks, plus the start in ticks since boot from `/proc/self/stat`.
fn start_time_from_proc() -> Option<f64> {
    let stat = Process::myself().ok()?.stat().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    if ticks <= 0.0 {
        return None;
    }
    let realtime = unix_now(SystemTime::now());
    let since_boot = timespec_secs(rustix::time::clock_gettime(rustix::time::ClockId::Boottime));
    let boot = realtime - since_boot;
    Some(boot + stat.starttime as f64 / ticks)
}

fn timespec_secs(t: rustix::time::Timespec) -> f64 {
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn gauge(name: &str, help: &str, value: f64) -> Vec<MetricFamily> {
    match Gauge::new(name, help) {
        Ok(g) => {
            g.set(value);
            g.collect()
        }
        Err(_) => Vec::new(),
    }
}

fn counter(name: &str, help: &str, value: f64) -> Vec<MetricFamily> {
    match Counter::new(name, help) {
        Ok(c) => {
            if value.is_finite() && value >= 0.0 {
                c.inc_by(value);
            }
            c.collect()
        }
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_process_metric_is_read_here() {
        let families = ProcessMetrics::new().families();
        let names: Vec<_> = families.iter().map(|f| f.name().to_string()).collect();
        assert_eq!(
            names,
            [
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_virtual_memory_bytes",
                "process_open_fds",
                "process_max_fds",
                "process_start_time_seconds",
            ]
        );
    }

    #[test]
    fn start_time_is_this_process_start() {
        let start = ProcessMetrics::new().start_time;
        let now = unix_now(SystemTime::now());
        // The test binary started less than an hour ago, and not in the future.
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
        let stat_start = start_time_from_proc().unwrap_or_default();
        assert!((stat_start - start).abs() < 1.0, "{stat_start} vs {start}");
    }
}
