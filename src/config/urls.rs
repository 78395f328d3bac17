//! URLs in the configuration: parsed without quoting them in errors, checked, redacted for
//! printing, and given their password.

use super::*;

#[allow(clippy::expect_used)] // Called only with the URL literals above; a unit test parses each default.
pub(super) fn local_url(s: &str) -> Url {
    Url::parse(s).expect("built-in default URL parses")
}

pub(super) fn validate_url(
    key: &'static str,
    url: &Url,
    schemes: &[&str],
) -> Result<(), ConfigError> {
    check_url(url, schemes).map_err(|e| invalid(key, e))
}

pub(super) fn check_url(url: &Url, schemes: &[&str]) -> Result<(), String> {
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "scheme `{}` is not one of {}",
            url.scheme(),
            schemes.join(", ")
        ));
    }
    // PostgreSQL URLs may name the host in the query instead, as libpq does: a Unix socket
    // directory such as `postgres:///weather?host=/run/postgresql` (peer authentication).
    let host_param = url.scheme().starts_with("postgres")
        && url.query_pairs().any(|(k, v)| k == "host" && !v.is_empty());
    if url.fragment().is_some() {
        // libpq and tokio-postgres read `#` as part of a value (`password=ab#cd`); here it would
        // start a fragment, and be neither redacted nor passed on as written.
        return Err("the URL has a `#`: percent-encode it as %23".into());
    }
    if url.host_str().is_none_or(str::is_empty) && !host_param {
        return Err("the URL names no host".into());
    }
    Ok(())
}

/// A URL from the config. `Url`'s own `Deserialize` quotes the text it cannot parse, and that
/// text may hold a password; this error says only what is wrong (figment adds the key).
pub(super) fn quiet_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    Url::parse(&text).map_err(|e| serde::de::Error::custom(format!("not a valid URL ({e})")))
}

pub(super) fn quiet_url_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Url>, D::Error> {
    quiet_url(d).map(Some)
}

/// `url` with its password replaced: the one after the user name, and any query parameter named
/// `password` (libpq reads one there).
pub(super) fn redact_url(url: &Url) -> Url {
    let mut url = url.clone();
    if url.password().is_some() {
        // set_password only fails for URLs that cannot have one, which then have none to hide.
        let _ = url.set_password(Some(REDACTED));
    }
    if url
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| match k.eq_ignore_ascii_case("password") {
                true => (k.into_owned(), REDACTED.to_owned()),
                false => (k.into_owned(), v.into_owned()),
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url
}

pub(super) fn with_password(url: &Url, password: Option<&Secret>) -> Url {
    let mut url = url.clone();
    if let Some(p) = password {
        // Fails only for URLs without a host, which validation rejects.
        let _ = url.set_password(Some(p.expose()));
    }
    url
}
