//! InitProducerId v0-4. Idempotent producers (no transactional.id) get a producer id never
//! handed out before, epoch 0; transactional ones go to their transaction coordinator
//! (`kafka::txn`, `txn`), which keeps the id's producer id and bumps its epoch.

use futures::channel::oneshot;
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};

use super::errors::*;
use super::{decode, respond, Response};
use crate::cluster::controller::CONTROLLER_SHARD;
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::{shard, ShardMsg};

pub async fn handle(frame: RequestFrame) -> Result<Response, String> {
    let req: InitProducerIdRequest = decode(&frame)?;
    let s = shard();
    let mut resp = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if req
        .transactional_id
        .as_ref()
        .is_some_and(|t| !t.0.is_empty())
    {
        match super::txn::init_producer_id(&req).await {
            Ok((pid, epoch)) => {
                resp = resp
                    .with_producer_id(ProducerId(pid))
                    .with_producer_epoch(epoch)
            }
            Err(code) => resp.error_code = code,
        }
        return respond(&frame, OutBuf::new(), &resp);
    }
    let (tx, rx) = oneshot::channel();
    s.send(CONTROLLER_SHARD, ShardMsg::AllocateProducerId { reply: tx })
        .await;
    match rx.await.ok().flatten() {
        Some(id) => resp = resp.with_producer_id(ProducerId(id)).with_producer_epoch(0),
        None => resp.error_code = COORDINATOR_NOT_AVAILABLE,
    }
    respond(&frame, OutBuf::new(), &resp)
}
