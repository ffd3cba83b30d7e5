//! The Kafka wire protocol: framing, the versions Weir advertises, and response encoding that
//! splices stored record batches into the output without copying them.
//!
//! Every request and response body is decoded and encoded by the kafka-protocol crate.

pub mod out;
pub mod versions;

use anyhow::{bail, Result};
use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable};

pub use out::OutBuf;

/// A request frame's header fields, read before the body is decoded.
#[derive(Debug)]
pub struct RequestFrame {
    pub api_key: ApiKey,
    pub api_version: i16,
    pub header: RequestHeader,
    /// The body, after the header.
    pub body: Bytes,
    /// The client's address as Kafka reports it ("/127.0.0.1"), set by the connection.
    pub client_host: String,
    /// Bytes of the whole frame (without its size prefix): header and body.
    pub frame_bytes: usize,
}

/// What to do with a frame whose header cannot be served.
#[derive(Debug)]
pub enum FrameError {
    /// Unknown API key, undecodable header, or a version outside what we advertise for an API
    /// other than ApiVersions: close the connection.
    Close(String),
    /// ApiVersions at a version we do not support: answer UNSUPPORTED_VERSION with our list
    /// (KIP-511), as a v0 response.
    UnsupportedApiVersions { correlation_id: i32 },
}

/// Parses the request header of one frame (without the 4-byte size prefix).
pub fn parse_frame(mut frame: Bytes) -> Result<RequestFrame, FrameError> {
    if frame.len() < 8 {
        return Err(FrameError::Close(format!(
            "frame of {} bytes is shorter than a request header",
            frame.len()
        )));
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let Ok(api_key) = ApiKey::try_from(key) else {
        return Err(FrameError::Close(format!("unknown API key {key}")));
    };
    let Some(range) = versions::supported(api_key) else {
        return Err(FrameError::Close(format!(
            "API {api_key:?} is not supported"
        )));
    };
    if version < range.0 || version > range.1 {
        if api_key == ApiKey::ApiVersions {
            return Err(FrameError::UnsupportedApiVersions { correlation_id });
        }
        return Err(FrameError::Close(format!(
            "{api_key:?} v{version} is not supported (we support v{}-{})",
            range.0, range.1
        )));
    }
    let frame_bytes = frame.len();
    let header_version = api_key.request_header_version(version);
    let header = RequestHeader::decode(&mut frame, header_version)
        .map_err(|e| FrameError::Close(format!("undecodable request header: {e}")))?;
    Ok(RequestFrame {
        api_key,
        api_version: version,
        header,
        body: frame,
        client_host: String::new(),
        frame_bytes,
    })
}

/// Decodes a request body, or explains why it could not be.
pub fn decode_body<T: Decodable>(frame: &RequestFrame) -> Result<T> {
    let mut b = frame.body.clone();
    match T::decode(&mut b, frame.api_version) {
        Ok(v) => Ok(v),
        Err(e) => bail!(
            "undecodable {:?} v{} body: {e}",
            frame.api_key,
            frame.api_version
        ),
    }
}

/// Encodes a whole response frame (size prefix, header, body) into `out`. Record batches
/// registered with `out.splice` are referenced, not copied.
/// Consecutive items of the same topic gathered under one entry, in order: the shape of
/// Kafka's per-topic request and response arrays.
pub fn by_topic<K: PartialEq, T>(items: impl IntoIterator<Item = (K, T)>) -> Vec<(K, Vec<T>)> {
    let mut out: Vec<(K, Vec<T>)> = Vec::new();
    for (k, x) in items {
        match out.last_mut() {
            Some((last, xs)) if *last == k => xs.push(x),
            _ => out.push((k, vec![x])),
        }
    }
    out
}

pub fn encode_response<T: Encodable>(
    mut out: OutBuf,
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &T,
) -> Result<Vec<Bytes>> {
    let header_version = api_key.response_header_version(version);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let size = header.compute_size(header_version)? + body.compute_size(version)?;
    if size > i32::MAX as usize {
        bail!("response of {size} bytes is too large");
    }
    bytes::BufMut::put_i32(&mut out, size as i32);
    header.encode(&mut out, header_version)?;
    body.encode(&mut out, version)?;
    let parts = out.finish();
    debug_assert_eq!(parts.iter().map(|b| b.len()).sum::<usize>(), size + 4);
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::ApiVersionsRequest;
    use kafka_protocol::protocol::StrBytes;

    fn frame(key: i16, version: i16, body: &[u8]) -> Bytes {
        let mut v = Vec::new();
        v.extend_from_slice(&key.to_be_bytes());
        v.extend_from_slice(&version.to_be_bytes());
        v.extend_from_slice(&7i32.to_be_bytes());
        v.extend_from_slice(body);
        Bytes::from(v)
    }

    #[test]
    fn header_errors() {
        assert!(matches!(
            parse_frame(Bytes::from_static(&[0, 1, 2])),
            Err(FrameError::Close(_))
        ));
        assert!(matches!(
            parse_frame(frame(999, 0, &[])),
            Err(FrameError::Close(_))
        ));
        assert!(matches!(
            parse_frame(frame(0, 1, &[0, 0])),
            Err(FrameError::Close(_))
        ));
        assert!(matches!(
            parse_frame(frame(18, 99, &[])),
            Err(FrameError::UnsupportedApiVersions { correlation_id: 7 })
        ));
    }

    #[test]
    fn decodes_a_real_request() {
        let mut buf = bytes::BytesMut::new();
        let h = RequestHeader::default()
            .with_request_api_key(18)
            .with_request_api_version(3)
            .with_correlation_id(5)
            .with_client_id(Some(StrBytes::from_static_str("c")));
        h.encode(&mut buf, ApiKey::ApiVersions.request_header_version(3))
            .unwrap();
        ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("x"))
            .encode(&mut buf, 3)
            .unwrap();
        let f = parse_frame(buf.freeze()).unwrap();
        assert_eq!(f.header.correlation_id, 5);
        let r: ApiVersionsRequest = decode_body(&f).unwrap();
        assert_eq!(r.client_software_name.as_str(), "x");
    }
}
