//! `/metrics` over HTTP/1 with hyper. The listener is passed in: bound by the daemon, or handed
//! over by systemd.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Renders the metrics text; called on every scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// How long open scrapes may take to finish once shutdown starts.
const DRAIN: Duration = Duration::from_secs(2);

/// Connections served at once. A new connection beyond this closes the oldest one, so a flood
/// of idle connections can hold neither file descriptors nor the next real scrape.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a client may take to send a request's headers, on a new or a kept-alive connection.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a connection lives, however busy (Prometheus reconnects transparently).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Scrapes closer together than this get the same rendering: a flood of requests then costs
/// their I/O, not a rendering (and a read of `/proc`) each. Prometheus scrapes every few seconds.
pub const MIN_RENDER_INTERVAL: Duration = Duration::from_millis(250);

/// Requests answered per second at most, over all connections: a flood of requests (keep-alive,
/// back to back) then costs the metrics thread a bounded amount of CPU, which on a small machine
/// is the pipeline's. Requests beyond wait their turn (at most [`MAX_CONNECTIONS`] wait, so a real
/// scrape waits under a second).
pub const MAX_REQUESTS_PER_SECOND: u32 = 20;

/// Reserves the next free slot of the [`MAX_REQUESTS_PER_SECOND`] pace and waits for it.
async fn wait_turn(next: &std::sync::Mutex<tokio::time::Instant>) {
    let interval = Duration::from_secs(1) / MAX_REQUESTS_PER_SECOND;
    let at = {
        // Poisoned only by a panic, which aborts the process (panic = "abort").
        let mut next = next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = (*next).max(tokio::time::Instant::now());
        *next = at + interval;
        at
    };
    tokio::time::sleep_until(at).await;
}

/// `render`, called at most once per [`MIN_RENDER_INTERVAL`]: the text it gave last, if younger.
fn cached(render: Render) -> Render {
    let last: std::sync::Mutex<Option<(std::time::Instant, String)>> = Default::default();
    Arc::new(move || {
        // Poisoned only if `render` panicked, which aborts the process (panic = "abort").
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, text)) = &*last {
            if at.elapsed() < MIN_RENDER_INTERVAL {
                return text.clone();
            }
        }
        let text = render();
        *last = Some((std::time::Instant::now(), text.clone()));
        text
    })
}

fn respond(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, render()),
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned()),
        _ => (StatusCode::NOT_FOUND, "see /metrics\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// 401 with the challenge, for requests without valid credentials.
fn unauthorized() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(b"Unauthorized\n")));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    resp.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"sistema-mensajes\""),
    );
    resp
}

/// Serves one connection (plain or TLS) until it ends, is evicted (`done`) or is too old.
async fn serve_connection<I, S>(
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    done: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>> + Send + 'static,
    S::Future: Send + 'static,
{
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, service);
    let conn = watcher.watch(conn);
    tokio::select! {
        result = conn => if let Err(e) = result {
            debug!(message = "Metrics connection ended with an error.", error = %e);
        },
        _ = done.cancelled() => {}
        _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
    }
}

/// Serves until `token` is cancelled, then lets open requests finish (at most 2 s). With `web`,
/// over TLS and/or with basic authentication ([`crate::web`]).
pub async fn serve(
    listener: TcpListener,
    render: Render,
    web: Option<Arc<crate::web::Web>>,
    token: CancellationToken,
) {
    let render = cached(render);
    let pace = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
    let graceful = GracefulShutdown::new();
    let mut accept_backoff = Duration::from_millis(10);
    // Oldest first; a connection's token is cancelled when it ends, or to evict it.
    let mut open: std::collections::VecDeque<CancellationToken> = Default::default();
    loop {
        let stream = tokio::select! {
            _ = token.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accept_backoff = Duration::from_millis(10);
                    stream
                }
                Err(e) => {
                    // EMFILE and friends: wait, do not spin.
                    warn!(message = "Cannot accept a metrics connection.", error = %e);
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        open.retain(|t| !t.is_cancelled());
        if open.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                debug!("Too many metrics connections; closing the oldest.");
                oldest.cancel();
            }
        }
        let done = CancellationToken::new();
        open.push_back(done.clone());
        let (render, pace, auth) = (render.clone(), pace.clone(), web.clone());
        let service = service_fn(move |req| {
            let (render, pace, auth) = (render.clone(), pace.clone(), auth.clone());
            async move {
                wait_turn(&pace).await;
                if let Some(web) = &auth {
                    let header = req.headers().get(hyper::header::AUTHORIZATION);
                    if !web.authorized(header.map(HeaderValue::as_bytes)) {
                        return Ok::<_, Infallible>(unauthorized());
                    }
                }
                Ok::<_, Infallible>(respond(&req, &render))
            }
        });
        let watcher = graceful.watcher();
        let tls = web.as_ref().and_then(|w| w.tls.clone());
        tokio::spawn(async move {
            let _done = done.clone().drop_guard();
            match tls {
                None => serve_connection(TokioIo::new(stream), service, watcher, done).await,
                Some(acceptor) => {
                    // The handshake is bounded like a request's headers, and an evicted connection
                    // is closed in it too (else half-open handshakes would hold sockets past
                    // MAX_CONNECTIONS).
                    let evicted = done.clone();
                    let handshake = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream));
                    tokio::select! {
                        result = handshake => match result {
                            Ok(Ok(tls)) => serve_connection(TokioIo::new(tls), service, watcher, done).await,
                            Ok(Err(e)) => debug!(message = "Metrics TLS handshake failed.", error = %e),
                            Err(_) => debug!("Metrics TLS handshake timed out."),
                        },
                        _ = evicted.cancelled() => debug!("Too many metrics connections; closed one in its TLS handshake."),
                    }
                }
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("Metrics connections still open after the drain period; dropping them.");
    }
}
