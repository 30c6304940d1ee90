//! Database URLs as libpq reads them: every `sslmode` (`disable`, `allow`, `prefer`,
//! `require`, `verify-ca`, `verify-full`) and `sslrootcert`, which tokio-postgres's own
//! parser refuses; and the URL's target without its password, for messages.

use std::path::PathBuf;
use std::str::FromStr;

use postgres_native_tls::MakeTlsConnector;

use super::SinkError;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }
}

/// A parsed database URL: the connection settings, the TLS connector its `sslmode` asks
/// for, and where it points (without the password).
pub struct Database {
    pub config: tokio_postgres::Config,
    pub tls: MakeTlsConnector,
    pub target: String,
}

/// Parse a libpq URL (`postgres://user:pw@host:port/db?sslmode=verify-full&sslrootcert=ca.pem`)
/// or keyword string (`host=… sslmode=…`).
pub fn parse(url: &str) -> Result<Database, SinkError> {
    let (rest, mode, root) = split_tls_params(url)?;
    let mut config = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| SinkError::Fatal(format!("invalid database URL {}: {e}", redact(url))))?;
    let mode = mode.unwrap_or(SslMode::Prefer);
    config.ssl_mode(match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    let tls = connector(mode, root.as_deref())?;
    Ok(Database {
        target: target(&config),
        config,
        tls,
    })
}

/// What libpq checks: `require` (or weaker) encrypts without verifying, unless a root
/// certificate is given (then it verifies the chain, as libpq does); `verify-ca` verifies
/// the chain; `verify-full` the chain and the host name.
fn connector(mode: SslMode, root: Option<&std::path::Path>) -> Result<MakeTlsConnector, SinkError> {
    let mut b = native_tls::TlsConnector::builder();
    let verify_chain = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull)
        || (mode == SslMode::Require && root.is_some());
    if let Some(path) = root.filter(|p| p.as_os_str() != "system") {
        let pem = std::fs::read(path).map_err(|e| {
            SinkError::Fatal(format!("sslrootcert {}: cannot read: {e}", path.display()))
        })?;
        let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| {
            SinkError::Fatal(format!(
                "sslrootcert {}: not a PEM certificate: {e}",
                path.display()
            ))
        })?;
        b.add_root_certificate(cert);
    }
    b.danger_accept_invalid_certs(!verify_chain);
    b.danger_accept_invalid_hostnames(mode != SslMode::VerifyFull);
    let c = b
        .build()
        .map_err(|e| SinkError::Fatal(format!("TLS setup: {e}")))?;
    Ok(MakeTlsConnector::new(c))
}

/// Take `sslmode` and `sslrootcert` out of a URL's query or a keyword string.
fn split_tls_params(url: &str) -> Result<(String, Option<SslMode>, Option<PathBuf>), SinkError> {
    let mut mode = None;
    let mut root = None;
    let mut take = |k: &str, v: &str| -> Result<bool, SinkError> {
        match k {
            "sslmode" => {
                mode = Some(SslMode::parse(v).ok_or_else(|| {
                    SinkError::Fatal(format!("invalid sslmode {v:?} in the database URL (disable, allow, prefer, require, verify-ca or verify-full)"))
                })?);
                Ok(true)
            }
            "sslrootcert" => {
                root = Some(PathBuf::from(v));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if url.contains("://") {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(k, &percent_decode(v))? {
                kept.push(pair);
            }
        }
        match kept.is_empty() {
            true => base.to_owned(),
            false => format!("{base}?{}", kept.join("&")),
        }
    } else {
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            let (k, v) = word.split_once('=').unwrap_or((word, ""));
            if !take(k, v.trim_matches('\''))? {
                kept.push(word);
            }
        }
        kept.join(" ")
    };
    Ok((rest, mode, root))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `user@host:port/db` of a parsed config: what messages name (never the password).
pub fn target(c: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .zip(c.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
            tokio_postgres::config::Host::Unix(path) => format!("{}:{p}", path.display()),
        })
        .collect();
    format!(
        "{}@{}/{}",
        c.get_user().unwrap_or("?"),
        hosts.join(","),
        c.get_dbname().unwrap_or("?")
    )
}

/// A database URL with its password replaced by `***`: the URL form's userinfo and its
/// `password=` query parameter, and the keyword form's `password` (quoted or not, with or
/// without spaces around `=`).
pub fn redact(url: &str) -> String {
    match url.find("://") {
        Some(scheme_end) => redact_url(url, scheme_end + 3),
        None => redact_keywords(url),
    }
}

fn redact_url(url: &str, start: usize) -> String {
    let authority_end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..authority_end];
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let rest = &url[authority_end..];
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = (query.split('&'))
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => rest.to_owned(),
    };
    format!("{}{authority}{rest}", &url[..start])
}

/// libpq's keyword form: `key = value` pairs, a value single-quoted when it has spaces
/// (`\'` and `\\` escaped inside quotes).
fn redact_keywords(conninfo: &str) -> String {
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].split_whitespace().last().unwrap_or("");
        out.push_str(&rest[..=eq]);
        let after = &rest[eq + 1..];
        let spaces = after.len() - after.trim_start().len();
        out.push_str(&after[..spaces]);
        let value = &after[spaces..];
        let len = value_len(value);
        match key {
            "password" => out.push_str("***"),
            _ => out.push_str(&value[..len]),
        }
        rest = &value[len..];
    }
    out.push_str(rest);
    out
}

/// Bytes of a keyword-form value at the start of `s`: quoted up to its closing quote, else
/// up to whitespace.
fn value_len(s: &str) -> usize {
    if !s.starts_with('\'') {
        return s.find(char::is_whitespace).unwrap_or(s.len());
    }
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return i + 1,
            _ => {}
        }
    }
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_ssl_parameters_are_taken_out_of_urls_and_keyword_strings() {
        let (rest, mode, root) = split_tls_params(
            "postgres://u:p@db.example:5433/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@db.example:5433/app?application_name=x"
        );
        assert_eq!(mode, Some(SslMode::VerifyFull));
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
        let (rest, mode, root) =
            split_tls_params("host=db port=5433 sslmode=verify-ca sslrootcert=/ca.pem dbname=app")
                .unwrap();
        assert_eq!(rest, "host=db port=5433 dbname=app");
        assert_eq!(mode, Some(SslMode::VerifyCa));
        assert_eq!(root, Some(PathBuf::from("/ca.pem")));
        assert!(split_tls_params("postgres://h/db?sslmode=sometimes").is_err());
        let db = parse("postgres://u:secret@db.example:5433/app?sslmode=verify-full").unwrap();
        assert_eq!(db.target, "u@db.example:5433/app");
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://u:s3cret@h:5432/db?sslmode=require"),
            "postgres://u:***@h:5432/db?sslmode=require"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("host=h password=s3cret dbname=d"),
            "host=h password=*** dbname=d"
        );
        // Quoted values (spaces, escaped quotes), spaces around `=`, the URL's query.
        assert_eq!(
            redact("host=h password='Quoted Secret9' dbname=d"),
            "host=h password=*** dbname=d"
        );
        assert_eq!(
            redact(r"password = 'it\'s secret' user='a b'"),
            "password = *** user='a b'"
        );
        assert_eq!(
            redact("postgres://h/db?user=u&password=s3cret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        let e = parse("postgres://u:s3cret@h:notaport/db")
            .err()
            .unwrap()
            .to_string();
        assert!(!e.contains("s3cret") && e.contains("u:***@h"), "{e}");
    }
}
