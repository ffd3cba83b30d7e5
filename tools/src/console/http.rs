//! The HTTP plumbing of the console: query strings and form bodies (bounded), responses, and a
//! tiny HTTP/1.1 GET client for the broker's Prometheus endpoint.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Largest request body the console reads (a produce form with a big value); larger bodies are
/// refused with 413 before they are read.
pub const REQUEST_BODY_MAX_BYTES: usize = 1 << 20;

/// Largest response the metrics client reads from the Prometheus endpoint.
pub const METRICS_BODY_MAX_BYTES: usize = 8 << 20;

/// Connect, read and write timeout of the metrics client.
pub const METRICS_TIMEOUT_MS: u64 = 2_000;

/// An answer: status, content type and body.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// A `Location` for redirects (303 after a successful form post).
    pub location: Option<String>,
}

impl Reply {
    pub fn html(status: u16, body: String) -> Reply {
        Reply {
            status,
            content_type: "text/html; charset=utf-8",
            body,
            location: None,
        }
    }

    pub fn json(status: u16, v: &serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: v.to_string(),
            location: None,
        }
    }

    /// 303 See Other to `to` (a path built by the console, already percent-encoded).
    pub fn redirect(to: String) -> Reply {
        Reply {
            status: 303,
            content_type: "text/plain; charset=utf-8",
            body: format!("see {to}"),
            location: Some(to),
        }
    }
}

/// Decoded `application/x-www-form-urlencoded` pairs (query string or form body); the last
/// value of a repeated key wins.
#[derive(Default, Debug)]
pub struct Params(HashMap<String, String>);

impl Params {
    pub fn parse(text: &str) -> Params {
        Params(
            text.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode_component(k, true), decode_component(v, true))
                })
                .collect(),
        )
    }

    /// The value, trimmed; None when absent or blank.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// The value untrimmed (a record's value keeps its whitespace); None when absent.
    pub fn raw(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    /// A number, or an error that names the field and the text given.
    pub fn num<T: std::str::FromStr>(&self, key: &str, label: &str) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| anyhow!("{label}: {v:?} is not a valid number")),
        }
    }
}

/// Percent-decoding; `plus` turns '+' into ' ' (forms). Invalid escapes stay as written and
/// bytes that are not UTF-8 become U+FFFD.
pub fn decode_component(s: &str, plus: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if plus => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Percent-encodes everything but unreserved characters (for a topic or group in a path).
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// Reads a request body of at most REQUEST_BODY_MAX_BYTES; Err names the limit.
pub fn read_body(r: &mut dyn Read, declared: Option<usize>) -> Result<String> {
    if declared.is_some_and(|n| n > REQUEST_BODY_MAX_BYTES) {
        bail!("the request body is larger than {REQUEST_BODY_MAX_BYTES} bytes");
    }
    let mut buf = Vec::new();
    r.take(REQUEST_BODY_MAX_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .context("reading the request body")?;
    if buf.len() > REQUEST_BODY_MAX_BYTES {
        bail!("the request body is larger than {REQUEST_BODY_MAX_BYTES} bytes");
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// GET `url` (plain `http://host:port/path` only) and return the body of a 200 answer.
pub fn http_get(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs are supported, not {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let timeout = Duration::from_millis(METRICS_TIMEOUT_MS);
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .ok_or_else(|| anyhow!("{authority} resolves to no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {authority}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    // Read until the body is complete (by Content-Length or the chunked terminator), the
    // server closes, or the size limit; a server that keeps the connection open is fine.
    let limit = METRICS_BODY_MAX_BYTES + 64 * 1024;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some((head_len, length, chunked)) = response_head(&raw) {
            let have = raw.len() - head_len;
            if length.is_some_and(|n| have >= n) || (chunked && raw.ends_with(b"0\r\n\r\n")) {
                break;
            }
        }
        if raw.len() > limit {
            bail!("{url} answered more than {METRICS_BODY_MAX_BYTES} bytes");
        }
        let n = s
            .read(&mut buf)
            .with_context(|| format!("reading from {authority}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let (status, chunked, body) = split_response(&raw)?;
    let body = match response_head(&raw).and_then(|h| h.1) {
        Some(n) if !chunked => &body[..n.min(body.len())],
        _ => body,
    };
    if status != 200 {
        bail!("{url} answered HTTP {status}");
    }
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    if body.len() > METRICS_BODY_MAX_BYTES {
        bail!("{url} answered more than {METRICS_BODY_MAX_BYTES} bytes");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// (head length with its blank line, Content-Length, chunked) once the head has arrived.
fn response_head(raw: &[u8]) -> Option<(usize, Option<usize>, bool)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    Some((end + 4, length, chunked))
}

/// (status, chunked transfer encoding, body) of a raw HTTP/1.1 response.
fn split_response(raw: &[u8]) -> Result<(u16, bool, &[u8])> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("an HTTP response without a header end"))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("an HTTP response without a status"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok((status, chunked, &raw[end + 4..]))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("a truncated chunked body"))?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| anyhow!("a bad chunk size {size_text:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size {
            bail!("a truncated chunked body");
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_decode_plus_percent_and_bad_escapes() {
        let p = Params::parse("a=x+y%21&b=%zz&c=%e2%82%ac&d=&e=%ff&f=%4");
        assert_eq!(p.get("a"), Some("x y!"));
        assert_eq!(p.get("b"), Some("%zz"));
        assert_eq!(p.get("c"), Some("€"));
        assert_eq!(p.get("d"), None);
        assert_eq!(p.get("e"), Some("\u{fffd}"));
        assert_eq!(p.get("f"), Some("%4"));
        assert!(Params::parse("n=abc").num::<i32>("n", "Partition").is_err());
    }

    #[test]
    fn encode_round_trips() {
        let s = "a b/c?d&e%f";
        assert_eq!(decode_component(&encode_component(s), false), s);
    }

    #[test]
    fn http_get_reads_by_length_without_waiting_for_close() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut held = Vec::new();
            for reply in [
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            ] {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).unwrap();
                c.write_all(reply.as_bytes()).unwrap();
                // Keep the connection open: the client must not wait for the close.
                held.push(c);
            }
            held
        });
        let url = format!("http://{addr}/metrics");
        let t = std::time::Instant::now();
        assert_eq!(http_get(&url).unwrap(), "hello");
        assert_eq!(http_get(&url).unwrap(), "hi");
        assert!(http_get(&url).unwrap_err().to_string().contains("HTTP 404"));
        // Well under the client's read timeout: it never waited for a close.
        assert!(t.elapsed() < Duration::from_millis(METRICS_TIMEOUT_MS / 2));
        drop(server.join().unwrap());
        assert!(http_get("https://example.com/").is_err());
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
    }
}
