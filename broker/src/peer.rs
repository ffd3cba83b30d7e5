//! Kafka requests from this broker to another broker's client listener: the replica fetcher's
//! fetches and the transaction coordinator's WriteTxnMarkers. One request at a time per
//! connection; responses are read as their bytes arrive (never reserved ahead of them) and
//! refused above `frame_max`.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bytes::{Bytes, BytesMut};
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// A connection to a broker's client listener.
pub struct Conn {
    pub addr: String,
    stream: TcpStream,
    next_correlation: i32,
    client_id: &'static str,
}

impl Conn {
    pub async fn connect(addr: &str, client_id: &'static str, timeout: Duration) -> Result<Conn> {
        let sa: std::net::SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(_) => {
                let a = addr.to_string();
                crate::storage::log::blocking(move || {
                    use std::net::ToSocketAddrs;
                    a.to_socket_addrs().ok().and_then(|mut i| i.next())
                })
                .await
                .ok_or_else(|| anyhow!("cannot resolve {addr}"))?
            }
        };
        let stream = TcpStream::connect_timeout(sa, timeout)
            .await
            .map_err(|e| anyhow!("connecting to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            addr: addr.to_string(),
            stream,
            next_correlation: 1,
            client_id,
        })
    }

    /// Sends `req` as `api` v`version` and returns the decoded response, within `wait`.
    pub async fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        api: ApiKey,
        version: i16,
        req: &Req,
        wait: Duration,
        frame_max: usize,
    ) -> Result<Resp> {
        let corr = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1);
        let mut buf = BytesMut::with_capacity(1024);
        buf.extend_from_slice(&[0; 4]);
        RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(corr)
            .with_client_id(Some(StrBytes::from_static_str(self.client_id)))
            .encode(&mut buf, api.request_header_version(version))?;
        req.encode(&mut buf, version)?;
        let size = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&size.to_be_bytes());
        let stream = &mut self.stream;
        let io = async {
            stream.write_all(&buf).await?;
            let mut size = [0u8; 4];
            stream.read_exact(&mut size).await?;
            let size = i32::from_be_bytes(size);
            if size < 4 || size as usize > frame_max {
                bail!("response frame of {size} bytes");
            }
            // Grown as bytes arrive, never reserved ahead of them.
            let mut body = Vec::new();
            let mut chunk = vec![0u8; 256 << 10];
            while body.len() < size as usize {
                let want = (size as usize - body.len()).min(chunk.len());
                let n = stream.read(&mut chunk[..want]).await?;
                if n == 0 {
                    bail!("the broker closed the connection");
                }
                body.extend_from_slice(&chunk[..n]);
            }
            Ok::<_, anyhow::Error>(Bytes::from(body))
        };
        let timeout = glommio::timer::sleep(wait);
        let mut body = match futures::future::select(Box::pin(io), Box::pin(timeout)).await {
            futures::future::Either::Left((r, _)) => r?,
            futures::future::Either::Right(_) => bail!("no answer within {wait:?}"),
        };
        let h = ResponseHeader::decode(&mut body, api.response_header_version(version))?;
        if h.correlation_id != corr {
            bail!(
                "response {} does not answer request {corr}",
                h.correlation_id
            );
        }
        Ok(Resp::decode(&mut body, version)?)
    }
}
