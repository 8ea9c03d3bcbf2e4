//! A tiny HTTP/1.0 GET client for the agent's own endpoints; HTTP/1.0 keeps
//! it simple: the server closes the connection after one response.
use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET http://<addr><path>`.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<Response> {
    let mut last_err = anyhow!("{addr} resolves to no address");
    let addrs = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?;
    for sock in addrs {
        match TcpStream::connect_timeout(&sock, timeout) {
            Ok(stream) => return exchange(stream, addr, path, timeout),
            Err(err) => last_err = anyhow!(err).context(format!("connecting to {sock}")),
        }
    }
    Err(last_err)
}

fn exchange(mut stream: TcpStream, host: &str, path: &str, timeout: Duration) -> Result<Response> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\n\
         Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the response to GET {path}"))?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("truncated HTTP response")?;
    let head = std::str::from_utf8(&raw[..split]).context("non-UTF-8 HTTP header")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8(body).context("non-UTF-8 HTTP body")?,
    })
}

/// Servers should not answer HTTP/1.0 with chunks, but decoding is short.
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk")?;
        let size_field = std::str::from_utf8(&raw[..eol])?;
        let size_hex = size_field.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, thread};

    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn gets_from_a_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello").unwrap();
            request
        });
        let r = get(&addr, "/readyz", Duration::from_secs(5)).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        assert!(
            server
                .join()
                .unwrap()
                .starts_with("GET /readyz HTTP/1.0\r\n")
        );
    }
}
