//! What both binaries do around their pipeline: command line, config, logging, signals, the
//! metrics listener and a shutdown with a deadline. The binaries stay a few lines long.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{self, DaemonConfig, EXIT_CONFIG};
use crate::telemetry;

/// Exit code for a failure at run time (connection setup, shutdown deadline, unconfirmed readings).
pub const EXIT_FAILURE: u8 = 1;

/// Options both daemons take.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// TOML configuration file; environment variables (PRODUCER_* / CONSUMER_*, `__` for nesting)
    /// override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print the effective one (passwords redacted) and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// Loads and validates the config, and starts logging. `Err` carries the exit code: 78 for a bad
/// config, 0 after `--check-config`.
pub fn setup<C: DaemonConfig>(args: &CommonArgs, name: &str) -> Result<C, ExitCode> {
    setup_checking(args, name, true)
}

/// [`setup`], reading the passwords at start only with `secrets` (a one-shot command that needs
/// only some of them reads those itself).
pub fn setup_checking<C: DaemonConfig>(
    args: &CommonArgs,
    name: &str,
    secrets: bool,
) -> Result<C, ExitCode> {
    no_core_dumps(name);
    let config_error = |e: config::ConfigError| {
        eprintln!("{name}: configuration error: {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    let cfg: C = config::load(args.config.as_deref()).map_err(config_error)?;
    if args.check_config {
        print!("{}", config::render(&cfg));
        return Err(ExitCode::SUCCESS);
    }
    // Not for `--check-config`, which also runs where the secrets are not (a build, CI).
    if secrets {
        cfg.check_secrets().map_err(config_error)?;
    }
    match telemetry::init(cfg.log(), name) {
        Ok((target, fallback)) => {
            if let Some(why) = fallback {
                warn!(message = "Journald requested but unavailable.", why);
            }
            info!(message = "Starting.", version = env!("CARGO_PKG_VERSION"), log_target = ?target);
        }
        Err(e) => eprintln!("{name}: cannot start logging: {e}"),
    }
    Ok(cfg)
}

/// Sets this process's core-file limit to zero, soft and hard, so no crash (a watchdog abort
/// included) writes the passwords it holds to a core file or to systemd-coredump. The units also
/// say `LimitCORE=0`; this covers a daemon started by hand. (`PR_SET_DUMPABLE=0` would also keep
/// processes of the same user out of `/proc/<pid>/mem`; under `DynamicUser=yes` no other process
/// has our user, and it would make our own `/proc/self` files root's.)
pub fn no_core_dumps(name: &str) {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, zero) {
        eprintln!("{name}: cannot disable core dumps: {e}");
    }
}

/// The exit of a one-shot command: 0, or the error logged (the whole chain) and 1.
pub fn report<E: std::fmt::Display>(result: Result<(), E>) -> Result<(), ExitCode> {
    result.map_err(|e| {
        error!(message = "Failed.", error = %e);
        ExitCode::from(EXIT_FAILURE)
    })
}

/// What a daemon's pipeline shares with its binary: its metrics and its health.
pub struct Deps<M> {
    pub metrics: std::sync::Arc<M>,
    pub health: std::sync::Arc<crate::health::Health>,
}

impl<M: Default> Default for Deps<M> {
    fn default() -> Self {
        Self {
            metrics: Default::default(),
            health: Default::default(),
        }
    }
}

impl<M> Clone for Deps<M> {
    fn clone(&self) -> Self {
        Self {
            metrics: self.metrics.clone(),
            health: self.health.clone(),
        }
    }
}

/// A single-threaded runtime: the pipeline is I/O-bound, and one thread keeps memory small
/// (lapin runs its own I/O thread beside it).
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        })
}

/// Cancels `token` on the first SIGTERM or SIGINT. SIGHUP, which would otherwise end the process,
/// is logged and ignored: nothing is reloaded (restart the unit to apply a new config).
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let which = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => warn!("SIGHUP ignored: nothing is reloaded; restart the service to apply a new configuration."),
                _ = token.cancelled() => return,
            }
        };
        info!(message = "Shutting down.", signal = which);
        token.cancel();
    });
    Ok(())
}

/// Awaits `work`; once `token` is cancelled, gives it at most `deadline` to finish.
pub async fn with_deadline<T>(
    work: impl Future<Output = T>,
    token: &CancellationToken,
    deadline: Duration,
) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => Some(out),
        _ = async { token.cancelled().await; tokio::time::sleep(deadline).await } => {
            error!(message = "Shutdown took longer than shutdown_timeout; exiting anyway.", timeout_s = deadline.as_secs_f64());
            None
        }
    }
}

/// What [`serve`] needs to know about a daemon besides its work.
pub struct Service {
    /// Where to bind `/metrics` when systemd passes no socket; `None` serves no metrics.
    pub listen: Option<SocketAddr>,
    /// TLS and basic authentication for `/metrics` (`metrics.web_config_file`).
    pub web: Option<std::sync::Arc<crate::web::Web>>,
    pub render: crate::http::Render,
    pub health: std::sync::Arc<crate::health::Health>,
    pub status: crate::systemd::StatusLine,
    pub shutdown_timeout: Duration,
}

impl Service {
    /// A daemon's service: `/metrics` is `render` of `deps`' metrics in its current phase, and the
    /// status line `status` of them. `listen` is `None` for a run that serves no metrics.
    pub fn new<M: Send + Sync + 'static>(
        deps: &Deps<M>,
        listen: Option<SocketAddr>,
        metrics: &config::MetricsConfig,
        shutdown_timeout: Duration,
        render: fn(&M, crate::health::Phase) -> String,
        status: fn(&M, &crate::health::Health) -> String,
    ) -> Result<Self, ExitCode> {
        // Checked at start with the rest of the configuration; read again here.
        let web = metrics.web().map_err(|e| {
            eprintln!("configuration error: {e}");
            ExitCode::from(EXIT_CONFIG)
        })?;
        let (m, h) = (deps.metrics.clone(), deps.health.clone());
        let render = std::sync::Arc::new(move || render(&m, h.phase()));
        let (m, h) = (deps.metrics.clone(), deps.health.clone());
        Ok(Self {
            listen,
            web,
            render,
            status: std::sync::Arc::new(move || status(&m, &h)),
            health: deps.health.clone(),
            shutdown_timeout,
        })
    }
}

/// The metrics listener: the socket systemd passed, else `addr` bound here; non-blocking, for
/// the metrics thread's runtime.
pub fn metrics_listener_or_bind(addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let listener = match crate::systemd::metrics_listener() {
        Ok(Some(std)) => {
            let local = std.local_addr().map_err(|e| e.to_string())?;
            info!(message = "Serving metrics on the socket systemd passed.", address = %local, path = "/metrics");
            return Ok(std);
        }
        Ok(None) => std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        Err(e) => return Err(e.to_string()),
    };
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    info!(message = "Serving metrics.", address = %local, path = "/metrics");
    Ok(listener)
}

/// Serves `/metrics` on a thread of its own, with its own single-threaded runtime, until `token`
/// is cancelled: scrapes, or a flood of connections to the port, then take no time from the
/// pipeline's thread. The receiver completes when the thread is done.
fn spawn_metrics(
    listener: std::net::TcpListener,
    render: crate::http::Render,
    web: Option<std::sync::Arc<crate::web::Web>>,
    token: CancellationToken,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|rt| {
                    rt.block_on(async {
                        let listener = TcpListener::from_std(listener)?;
                        crate::http::serve(listener, render, web, token).await;
                        Ok(())
                    })
                });
            if let Err(e) = served {
                error!(message = "Cannot serve metrics.", error = %e);
            }
            let _ = done.send(());
        })?;
    Ok(finished)
}

/// Takes the metrics listener, serves `/metrics`, reports to systemd, installs the signal
/// handlers and runs `work` until it returns, with `shutdown_timeout` once a signal came.
/// `Err` is the exit code.
pub async fn serve<T, E, F, Fut>(svc: Service, work: F) -> Result<T, ExitCode>
where
    E: std::fmt::Display,
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let failure = ExitCode::from(EXIT_FAILURE);
    let token = CancellationToken::new();
    let listener = match svc.listen {
        Some(addr) => Some(metrics_listener_or_bind(addr).map_err(|e| {
            error!(message = "Cannot serve metrics.", error = %e);
            failure
        })?),
        None => None,
    };
    cancel_on_signals(token.clone()).map_err(|e| {
        error!(message = "Cannot install signal handlers.", error = %e);
        failure
    })?;
    let tracker = tokio_util::task::TaskTracker::new();
    if let Some(listener) = listener {
        let finished =
            spawn_metrics(listener, svc.render, svc.web, token.child_token()).map_err(|e| {
                error!(message = "Cannot start the metrics thread.", error = %e);
                failure
            })?;
        tracker.spawn(async move {
            let _ = finished.await;
        });
    }
    // Sends STOPPING=1 as soon as the token is cancelled, when shutdown starts.
    tracker.spawn(crate::systemd::supervise(
        svc.health,
        svc.status,
        token.clone(),
    ));
    tracker.close();
    let outcome = with_deadline(work(token.clone()), &token, svc.shutdown_timeout).await;
    token.cancel();
    tracker.wait().await;
    match outcome {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => {
            error!(message = "Stopped on an error.", error = %e);
            Err(failure)
        }
        None => Err(failure),
    }
}
