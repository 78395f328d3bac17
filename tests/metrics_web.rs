//! `/metrics` with a web configuration file (the Prometheus exporters' format): TLS, basic
//! authentication, client certificates; checked with curl and scraped by a real Prometheus with
//! the matching scrape settings.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sistema_mensajes::web::Web;
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "scrape-secret-8080";

/// A CA in `dir` (`ca.pem`) and two certificates it signs: `server.{pem,key}` for localhost and
/// `client.{pem,key}` for a scraper.
fn pki(dir: &Path) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "metrics CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (stem, usage) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, stem);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        write_key(&dir.join(format!("{stem}.key")), &key.serialize_pem());
    }
}

/// Serves `/metrics` with the web configuration `yaml` (written to `dir`); returns its port.
async fn serve(dir: &Path, name: &str, yaml: &str, token: &CancellationToken) -> u16 {
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    let web = Web::load(&file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let render: sistema_mensajes::http::Render = Arc::new(|| "sistema_up 1\n".to_owned());
    tokio::spawn(sistema_mensajes::http::serve(
        listener,
        render,
        Some(Arc::new(web)),
        token.child_token(),
    ));
    port
}

/// curl's HTTP status for `url` with `args` ("000": no HTTP answer at all).
async fn status(url: String, args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .args(&args)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_over_tls_with_basic_auth_refuse_everything_else_and_prometheus_scrapes_them() {
    let dir = std::env::temp_dir().join(unique_name("metrics-web"));
    std::fs::create_dir_all(&dir).unwrap();
    pki(&dir);
    let d = |f: &str| dir.join(f).display().to_string();
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    let token = CancellationToken::new();
    let port = serve(
        &dir,
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  prometheus: {hash}\n",
            d("server.pem"),
            d("server.key")
        ),
        &token,
    )
    .await;
    let url = format!("https://localhost:{port}/metrics");
    let ca = s(&["--cacert", &d("ca.pem")]);
    let with = |extra: &[&str]| [ca.clone(), s(extra)].concat();

    // Twice: the second request meets the credentials already verified.
    for _ in 0..2 {
        let auth = format!("prometheus:{PASSWORD}");
        assert_eq!(status(url.clone(), with(&["-u", &auth])).await, "200");
    }
    assert_eq!(
        status(url.clone(), with(&["-u", "prometheus:wrong"])).await,
        "401"
    );
    assert_eq!(
        status(url.clone(), with(&["-u", &format!("nobody:{PASSWORD}")])).await,
        "401"
    );
    assert_eq!(status(url.clone(), ca.clone()).await, "401");
    // No plain text on the TLS port, and no TLS the client cannot verify.
    assert_eq!(
        status(
            format!("http://localhost:{port}/metrics"),
            s(&["-u", &format!("prometheus:{PASSWORD}")])
        )
        .await,
        "000"
    );
    assert_eq!(
        status(url.clone(), s(&["-u", &format!("prometheus:{PASSWORD}")])).await,
        "000"
    );

    // Client certificates, required: without one the handshake fails, with one it is served.
    let mtls = serve(
        &dir,
        "mtls.yml",
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
            d("server.pem"),
            d("server.key"),
            d("ca.pem")
        ),
        &token,
    )
    .await;
    let mtls_url = format!("https://localhost:{mtls}/metrics");
    assert_eq!(status(mtls_url.clone(), ca.clone()).await, "000");
    assert_eq!(
        status(
            mtls_url,
            with(&["--cert", &d("client.pem"), "--key", &d("client.key")])
        )
        .await,
        "200"
    );

    // A real Prometheus, with the scrape settings that match (scheme, tls_config, basic_auth
    // with a password file), sees the target up.
    std::fs::write(dir.join("password"), PASSWORD).unwrap();
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sistema\n    scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      username: prometheus\n      password_file: {}\n    static_configs:\n      - targets: ['localhost:{port}']\n",
            d("ca.pem"),
            d("password")
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", d("prometheus.yml")))
        .arg(format!("--storage.tsdb.path={}", d("tsdb")))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .arg("--log.level=warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("Debian's prometheus (.ci/run installs it)");
    let query = format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=up%7Bjob%3D%22sistema%22%7D%3D%3D1"
    );
    wait_until(
        Duration::from_secs(60),
        "Prometheus scrapes /metrics over TLS with basic auth",
        || async {
            let query = query.clone();
            tokio::task::spawn_blocking(move || {
                Command::new("curl")
                    .args(["-s", &query])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("\"value\""))
                    .unwrap_or(false)
            })
            .await
            .unwrap()
        },
    )
    .await;
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    token.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a web configuration cannot honour is refused by name.
#[test]
fn web_configurations_that_cannot_be_honoured_are_refused_by_name() {
    let dir = std::env::temp_dir().join(unique_name("metrics-web-bad"));
    std::fs::create_dir_all(&dir).unwrap();
    pki(&dir);
    let d = |f: &str| dir.join(f).display().to_string();
    let tls = format!(
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
        d("server.pem"),
        d("server.key")
    );
    let cases: Vec<(String, &str)> = vec![
        (
            "basic_auth_users:\n  p: plain-text-secret\n".into(),
            "not a bcrypt hash",
        ),
        (format!("{tls}  key: inline\n"), "unknown field `key`"),
        (
            format!("{tls}  client_auth_type: RequireAnyClientCert\n"),
            "RequireAnyClientCert is not supported",
        ),
        (
            format!("{tls}  client_auth_type: RequireAndVerifyClientCert\n"),
            "needs client_ca_file",
        ),
        (
            "http_server_config:\n  http2: false\n".into(),
            "unknown field `http_server_config`",
        ),
        ("{}\n".into(), "protects nothing"),
        (
            format!("{tls}  client_ca_file: {}\n", d("ca.pem")),
            "client_ca_file without client_auth_type",
        ),
        (
            "basic_auth_users:\n  p: $2b$13$Iwtfg9wyqAHowaicJUbuG.7yAq5ubxYRquBMmaDEvI5b/XOlbJzFm\n".into(),
            "bcrypt cost 13 is above 12",
        ),
        (
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                d("server.pem"),
                d("client.key")
            ),
            "does not go with cert_file",
        ),
        (
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: /nonexistent\n",
                d("server.pem")
            ),
            "key_file=/nonexistent: cannot read it",
        ),
    ];
    for (yaml, expected) in cases {
        let file: PathBuf = dir.join("web.yml");
        std::fs::write(&file, &yaml).unwrap();
        let e = Web::load(&file)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{yaml}"));
        assert!(e.contains(expected), "{yaml}\n→ {e}");
        assert!(!e.contains("plain-text-secret"), "{e}");
    }
    // The NixOS module writes the file as JSON, which is YAML too.
    let json = serde_json::json!({
        "tls_server_config": {"cert_file": d("server.pem"), "key_file": d("server.key"),
            "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": d("ca.pem")},
        "basic_auth_users": {"prometheus": bcrypt::hash("x", 4).unwrap()},
    });
    let file = dir.join("web.json");
    std::fs::write(&file, json.to_string()).unwrap();
    let web = Web::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert!(web.tls.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A flood of wrong passwords is refused without a queue: right after it, the right password is
/// checked again within the bcrypt pace, not after the flood's backlog.
#[tokio::test]
async fn a_flood_of_wrong_passwords_leaves_no_backlog() {
    let dir = std::env::temp_dir().join(unique_name("metrics-web-flood"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("web.yml");
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    std::fs::write(&file, format!("basic_auth_users:\n  prometheus: {hash}\n")).unwrap();
    let web = Web::load(&file).unwrap();
    let header = |credentials: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    };
    for _ in 0..200 {
        assert!(!web.authorized(Some(header("prometheus:wrong").as_bytes())));
        assert!(!web.authorized(Some(header(&format!("nobody:{PASSWORD}")).as_bytes())));
    }
    let right = header(&format!("prometheus:{PASSWORD}"));
    // 400 refusals queued at 4 a second would take 100 s; unqueued, one pace interval.
    wait_until(
        Duration::from_secs(3),
        "the right password accepted after the flood",
        || async { web.authorized(Some(right.as_bytes())) },
    )
    .await;
    // Verified once, it passes at once, even while wrong ones keep coming.
    for _ in 0..50 {
        assert!(!web.authorized(Some(header("prometheus:wrong").as_bytes())));
        assert!(web.authorized(Some(right.as_bytes())));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Connections that never start their TLS handshake count against the same bound as any other:
/// past [`sistema_mensajes::http::MAX_CONNECTIONS`] the oldest are closed at once, not when their
/// handshake times out, and a real scrape still gets through.
#[tokio::test(flavor = "multi_thread")]
async fn connections_silent_in_the_tls_handshake_are_evicted_like_any_other() {
    use std::io::Read;
    let dir = std::env::temp_dir().join(unique_name("metrics-web-evict"));
    std::fs::create_dir_all(&dir).unwrap();
    pki(&dir);
    let d = |f: &str| dir.join(f).display().to_string();
    let token = CancellationToken::new();
    let yaml = format!(
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
        d("server.pem"),
        d("server.key")
    );
    let port = serve(&dir, "web.yml", &yaml, &token).await;
    let silent: Vec<std::net::TcpStream> = (0..40)
        .map(|_| {
            let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let closed = |v: &[std::net::TcpStream]| {
        v.iter()
            .filter(|s| matches!((&mut &**s).read(&mut [0u8; 1]), Ok(0)))
            .count()
    };
    let evicted = silent.len() - sistema_mensajes::http::MAX_CONNECTIONS;
    // Well before the 5 s a handshake may take: closed because evicted, not because timed out.
    wait_until(
        Duration::from_secs(3),
        "the oldest silent connections closed",
        || {
            let n = closed(&silent);
            async move { n >= evicted }
        },
    )
    .await;
    let ca = s(&["--cacert", &d("ca.pem")]);
    assert_eq!(
        status(format!("https://localhost:{port}/metrics"), ca).await,
        "200"
    );
    token.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}
