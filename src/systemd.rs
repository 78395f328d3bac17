//! Everything systemd: the metrics socket it passes (`LISTEN_FDS`), and the notify protocol
//! (`READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`). The only module with `unsafe`.
//!
//! `NOTIFY_SOCKET` is never unset (sd-notify 0.4's `notify(true, ..)` did that and silently lost
//! every later message), and `WATCHDOG_USEC` is read without unsetting it.

use std::net::TcpListener;
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use socket2::{Domain, SockRef, Type};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::health::{Health, Phase};

/// `FileDescriptorName=` of the metrics socket in the `.socket` units.
pub const METRICS_FD_NAME: &str = "metrics";

/// Shortest time without progress that counts as a stall, whatever `WATCHDOG_USEC` says: idle
/// loops beat every 250 ms.
pub const MIN_STALL: Duration = Duration::from_secs(1);

/// How often `STATUS=` is refreshed.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot read the sockets passed by systemd (LISTEN_FDS): {0}")]
    ListenFds(#[source] std::io::Error),
    #[error("systemd passed {0} sockets; expected one, named `metrics`")]
    TooMany(usize),
    #[error("systemd passed a socket named `{0}`; expected `metrics` (FileDescriptorName=)")]
    WrongName(String),
    #[error("the socket systemd passed (fd {fd}) is not a listening TCP stream socket: {why}")]
    NotTcp { fd: RawFd, why: String },
}

/// The metrics listener systemd passed, if any. A socket that is not a listening TCP stream
/// socket, or more than one socket, is an error: the operator's units are wrong.
pub fn metrics_listener() -> Result<Option<TcpListener>, SystemdError> {
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
        .map_err(SystemdError::ListenFds)?
        .collect();
    let (fd, name) = match fds.as_slice() {
        [] => return Ok(None),
        [one] => one.clone(),
        more => return Err(SystemdError::TooMany(more.len())),
    };
    // systemd names unnamed sockets "unknown" (or passes no names at all).
    if name != METRICS_FD_NAME && name != "unknown" && !name.is_empty() {
        return Err(SystemdError::WrongName(name));
    }
    // SAFETY: `fd` was passed by systemd for this process (LISTEN_PID matched) and stays open
    // for the whole process; nothing else in the process owns or closes it. The borrow ends
    // before ownership is taken below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    check_tcp_listener(SockRef::from(&borrowed)).map_err(|why| SystemdError::NotTcp { fd, why })?;
    // SAFETY: as above; this is the single place that takes ownership of the descriptor.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    listener
        .set_nonblocking(true)
        .map_err(|e| SystemdError::NotTcp {
            fd,
            why: e.to_string(),
        })?;
    Ok(Some(listener))
}

fn check_tcp_listener(sock: SockRef<'_>) -> Result<(), String> {
    let domain = sock.domain().map_err(|e| e.to_string())?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(format!(
            "its address family is {domain:?}, not IPv4 or IPv6"
        ));
    }
    let kind = sock.r#type().map_err(|e| e.to_string())?;
    if kind != Type::STREAM {
        return Err(format!("its type is {kind:?}, not a stream"));
    }
    if !sock.is_listener().map_err(|e| e.to_string())? {
        return Err(
            "it is not listening (Accept=yes would pass connections: use Accept=no)".into(),
        );
    }
    Ok(())
}

/// Sends notify messages if `NOTIFY_SOCKET` is set; failures are logged at debug, never fatal.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    pub fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            debug!(message = "Cannot send a notification to systemd.", error = %e);
        }
    }
}

/// Builds the `STATUS=` line from the daemon's state.
pub type StatusLine = Arc<dyn Fn() -> String + Send + Sync>;

/// Reports to systemd until `token` is cancelled: `READY=1` once the daemon first reaches
/// [`Phase::Running`], `STATUS=` every [`STATUS_INTERVAL`] and on each phase change, `WATCHDOG=1`
/// at half of `WATCHDOG_USEC` while [`Health`] shows no stall, and `STOPPING=1` at the end.
pub async fn supervise(health: Arc<Health>, status: StatusLine, token: CancellationToken) {
    let notifier = Notifier::from_env();
    let watchdog = sd_notify::watchdog_enabled();
    let stall_limit = watchdog.unwrap_or(Duration::from_secs(30)).max(MIN_STALL);
    let mut phases = health.subscribe();
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| w / 2));
    let mut ready = false;
    let mut stalled = false;
    if let Some(w) = watchdog {
        info!(
            message = "systemd watchdog enabled.",
            interval_ms = w.as_millis() as u64
        );
    }
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            changed = phases.changed() => {
                if changed.is_err() {
                    break;
                }
                let line = status();
                if !ready && *phases.borrow_and_update() == Phase::Running {
                    ready = true;
                    info!(message = "Ready.", status = %line);
                    notifier.send(&[NotifyState::Ready, NotifyState::Status(&line)]);
                } else {
                    notifier.send(&[NotifyState::Status(&line)]);
                }
            }
            _ = status_tick.tick() => notifier.send(&[NotifyState::Status(&status())]),
            _ = watchdog_tick.tick(), if watchdog.is_some() => match health.stalled(stall_limit) {
                None => {
                    if stalled {
                        info!("The pipeline is making progress again; watchdog pings resume.");
                        stalled = false;
                    }
                    notifier.send(&[NotifyState::Watchdog]);
                }
                Some(how_long) => {
                    if !stalled {
                        error!(message = "The pipeline is stuck; withholding watchdog pings so systemd restarts the daemon.", stuck_for_s = how_long.as_secs_f64());
                        stalled = true;
                    }
                }
            },
        }
    }
    notifier.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}
