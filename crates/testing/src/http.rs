//! A blocking HTTP GET for the tests of `/metrics`, `/health` and `/ready`.

/// A plain HTTP/1.1 GET against a local endpoint (e.g. `/metrics`); the whole response,
/// status line included. For tests and health checks; no dependency on an HTTP client.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
