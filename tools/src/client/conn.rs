//! One connection to a broker: framing, correlation ids, and API version negotiation. Requests
//! may be pipelined: `send` returns the correlation id, `recv` reads responses in order.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// Largest response frame accepted from a broker.
pub const RESPONSE_BYTES_MAX: usize = 256 << 20;

pub struct Conn {
    stream: TcpStream,
    next_correlation: i32,
    /// API key -> (min, max) the broker supports.
    versions: HashMap<i16, (i16, i16)>,
    client_id: String,
    /// (correlation id, api key, version) of requests whose responses are not yet read.
    in_flight: VecDeque<(i32, ApiKey, i16)>,
    pub addr: String,
}

impl Conn {
    /// Connects and negotiates API versions.
    pub fn connect(addr: &str, client_id: &str, timeout: Duration) -> Result<Conn> {
        let sock = addr
            .to_socket_addrs()
            .with_context(|| format!("resolving {addr}"))?
            .next()
            .ok_or_else(|| anyhow!("{addr} resolves to no address"))?;
        let stream = TcpStream::connect_timeout(&sock, timeout)
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout.max(Duration::from_secs(1))))?;
        stream.set_write_timeout(Some(timeout.max(Duration::from_secs(1))))?;
        let mut c = Conn {
            stream,
            next_correlation: 1,
            versions: HashMap::new(),
            client_id: client_id.to_string(),
            in_flight: VecDeque::new(),
            addr: addr.to_string(),
        };
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("weir-tools"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let r: ApiVersionsResponse = c.call_at(ApiKey::ApiVersions, 3, &req)?;
        let r = if r.error_code == 35 {
            c.call_at::<_, ApiVersionsResponse>(
                ApiKey::ApiVersions,
                0,
                &ApiVersionsRequest::default(),
            )?
        } else {
            r
        };
        if r.error_code != 0 {
            bail!("{addr}: ApiVersions failed with error {}", r.error_code);
        }
        c.versions = r
            .api_keys
            .iter()
            .map(|k| (k.api_key, (k.min_version, k.max_version)))
            .collect();
        Ok(c)
    }

    /// The highest version both sides support, up to `ours`.
    pub fn version(&self, key: ApiKey, ours: i16) -> Result<i16> {
        let ours_min = key.valid_versions().min;
        let (lo, hi) = *self
            .versions
            .get(&(key as i16))
            .ok_or_else(|| anyhow!("{}: the broker does not support {key:?}", self.addr))?;
        let v = hi.min(ours);
        if v < lo.max(ours_min) {
            bail!(
                "{}: no common version of {key:?} (broker {lo}-{hi}, client up to {ours})",
                self.addr
            );
        }
        Ok(v)
    }

    pub fn send<R: Encodable>(&mut self, key: ApiKey, version: i16, req: &R) -> Result<i32> {
        let corr = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1);
        let mut buf = BytesMut::with_capacity(256);
        buf.extend_from_slice(&[0; 4]);
        RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(corr)
            .with_client_id(Some(StrBytes::from_string(self.client_id.clone())))
            .encode(&mut buf, key.request_header_version(version))?;
        req.encode(&mut buf, version)?;
        let size = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&size.to_be_bytes());
        self.stream
            .write_all(&buf)
            .with_context(|| format!("writing to {}", self.addr))?;
        self.in_flight.push_back((corr, key, version));
        Ok(corr)
    }

    /// Forgets requests whose responses another reader consumes (the producer's reader thread).
    pub fn forget_in_flight(&mut self) {
        self.in_flight.clear();
    }

    pub fn try_clone_stream(&self) -> Result<TcpStream> {
        Ok(self.stream.try_clone()?)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Reads the next response; it must answer the oldest request in flight.
    pub fn recv<T: Decodable>(&mut self) -> Result<(i32, T)> {
        let (corr, key, version) = self
            .in_flight
            .pop_front()
            .ok_or_else(|| anyhow!("no request in flight"))?;
        let mut size = [0u8; 4];
        self.stream
            .read_exact(&mut size)
            .with_context(|| format!("reading from {}", self.addr))?;
        let size = i32::from_be_bytes(size);
        if size < 4 || size as usize > RESPONSE_BYTES_MAX {
            bail!("{}: response of {size} bytes", self.addr);
        }
        let mut body = vec![0u8; size as usize];
        self.stream
            .read_exact(&mut body)
            .with_context(|| format!("reading from {}", self.addr))?;
        let mut body = Bytes::from(body);
        let h = ResponseHeader::decode(&mut body, key.response_header_version(version))?;
        if h.correlation_id != corr {
            bail!(
                "{}: response {} does not match request {corr}",
                self.addr,
                h.correlation_id
            );
        }
        Ok((corr, T::decode(&mut body, version)?))
    }

    /// Sends and waits for the answer at a fixed version.
    pub fn call_at<R: Encodable, T: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &R,
    ) -> Result<T> {
        self.send(key, version, req)?;
        Ok(self.recv()?.1)
    }

    /// Sends at the best common version up to `ours`; returns the response and that version.
    pub fn call<R: Encodable, T: Decodable>(
        &mut self,
        key: ApiKey,
        ours: i16,
        req: &R,
    ) -> Result<(T, i16)> {
        let v = self.version(key, ours)?;
        Ok((self.call_at(key, v, req)?, v))
    }
}
