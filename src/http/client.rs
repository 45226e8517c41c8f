//! A minimal HTTP/1.1 client for the CLI's ops commands, which only ever talk to this service's
//! own API on a trusted address.
//!
//! Written by hand rather than pulling in `reqwest` or enabling hyper's client half: one
//! request per connection (`Connection: close`), no TLS, no redirects, no pooling, bodies read
//! to the end, so about a hundred lines cover it, and nothing new is compiled (the build
//! machine has two cores).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response accepted (a DLQ peek of 1,000 large entries is the biggest the API gives).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the executor at {addr}: {source} (is `fifo-executor serve` running there?)"
    )]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP I/O with {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("the response is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("{0} is not a URL this client understands (expected http://host:port)")]
    BadUrl(String),
}

/// A response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Talks to one `host:port`.
#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port`, as connected to and sent in `Host`.
    authority: String,
    token: Option<String>,
    timeout: Duration,
}

impl Client {
    /// A client for the service listening on `listen` (`api.listen`). An unspecified address
    /// (`0.0.0.0`, `::`) is reached over loopback.
    pub fn for_listen_address(listen: SocketAddr) -> Self {
        let ip = match listen.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            }
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
                std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            }
            ip => ip,
        };
        Self::new(SocketAddr::new(ip, listen.port()).to_string())
    }

    /// A client for `http://host:port` (a trailing `/` is allowed, nothing else after it).
    pub fn for_url(url: &str) -> Result<Self, ClientError> {
        let authority = url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/') && !a.contains('@'))
            .ok_or_else(|| ClientError::BadUrl(url.to_owned()))?;
        Ok(Self::new(authority.to_owned()))
    }

    fn new(authority: String) -> Self {
        Self {
            authority,
            token: None,
            timeout: Duration::from_secs(90),
        }
    }

    /// The bearer token sent with every request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends one request (`path` includes the query) with an optional JSON body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        json_body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, json_body))
            .await
            .map_err(|_| ClientError::Timeout {
                addr: self.authority.clone(),
                timeout: self.timeout,
            })?
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        json_body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            addr: self.authority.clone(),
            source,
        };
        let mut stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.authority.clone(),
                source,
            })?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\nUser-Agent: fifo-executor-cli\r\n",
            self.authority
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let body = json_body.unwrap_or_default();
        if json_body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        stream.write_all(body).await.map_err(io)?;
        stream.flush().await.map_err(io)?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_to_end(&mut raw)
            .await
            .map_err(io)?;
        if raw.len() > MAX_RESPONSE_BYTES {
            return Err(ClientError::TooLarge);
        }
        parse_response(&raw)
    }
}

/// Parses a whole HTTP/1.1 response read until the server closed the connection.
pub fn parse_response(raw: &[u8]) -> Result<Response, ClientError> {
    let malformed = |what: &str| ClientError::Malformed(what.to_owned());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| malformed("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| malformed("headers not UTF-8"))?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| malformed("bad status line"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| malformed("bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = content_length {
        rest.get(..n)
            .ok_or_else(|| malformed("body shorter than Content-Length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let malformed = |what: &str| ClientError::Malformed(what.to_owned());
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| malformed("chunk size line not ended"))?;
        let size_text =
            std::str::from_utf8(&data[..line_end]).map_err(|_| malformed("chunk size not text"))?;
        // Chunk extensions (";name=value") are allowed and ignored.
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| malformed("bad chunk size"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| malformed("chunk shorter than its size"))?;
        body.extend_from_slice(chunk);
        data = data
            .get(size + 2..)
            .ok_or_else(|| malformed("chunk not followed by CRLF"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_with_content_length_is_read_to_its_length() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}")
            .expect("parses");
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn a_chunked_response_is_reassembled() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .expect("parses");
        assert_eq!(r.body, b"abcde");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for raw in [
            &b""[..],
            b"hello",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
        ] {
            assert!(
                parse_response(raw).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn urls_other_than_plain_http_host_port_are_refused() {
        assert_eq!(
            Client::for_url("http://127.0.0.1:8080/")
                .expect("valid")
                .authority(),
            "127.0.0.1:8080"
        );
        for bad in [
            "https://x:1",
            "http://",
            "http://a:1/api",
            "x:1",
            "http://u:p@h:1",
        ] {
            assert!(Client::for_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_unspecified_listen_address_is_reached_over_loopback() {
        let c = Client::for_listen_address("0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.authority(), "127.0.0.1:8080");
    }
}
