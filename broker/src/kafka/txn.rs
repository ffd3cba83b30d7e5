//! The transaction APIs: InitProducerId with a transactional id, AddPartitionsToTxn v0-3,
//! AddOffsetsToTxn, EndTxn, WriteTxnMarkers (broker to broker), DescribeTransactions and
//! ListTransactions. The coordinator's logic is `txn`; these handlers route each request to
//! the shard that owns the id's `__transaction_state` partition.

use futures::FutureExt;
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::describe_transactions_response::{TopicData, TransactionState};
use kafka_protocol::messages::list_transactions_response::TransactionState as ListedState;
use kafka_protocol::messages::write_txn_markers_response::{
    WritableTxnMarkerPartitionResult, WritableTxnMarkerResult, WritableTxnMarkerTopicResult,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Response};
use crate::protocol::{by_topic, OutBuf, RequestFrame};
use crate::shard::{shard, Shard};
use crate::txn::{self, TxnState, TXN_TOPIC};
use std::rc::Rc;

/// (coordinator shard, `__transaction_state` partition) of `id` on this broker.
fn coordinator(s: &Shard, id: &str) -> Result<(usize, i32), i16> {
    let partition = txn::partition_for(id, s.config.txn.partitions);
    super::coordinator_shard(s, TXN_TOPIC, partition)
}

/// The broker coordinating transactional id `id` (FindCoordinator key type 1).
pub fn coordinator_node(s: &Shard, id: &str) -> Result<(i32, String, i32), i16> {
    let partition = txn::partition_for(id, s.config.txn.partitions);
    super::coordinator_node(s, TXN_TOPIC, partition)
}

/// Runs `f` for `id` on its coordinator shard once its partition is loaded.
async fn on_coordinator<R: Send + 'static>(
    id: &str,
    f: impl FnOnce(Rc<Shard>, i32) -> futures::future::LocalBoxFuture<'static, Result<R, i16>>
        + Send
        + 'static,
) -> Result<R, i16> {
    let s = shard();
    let (target, partition) = coordinator(&s, id)?;
    s.run_on(target, move |t| {
        async move {
            if t.txns.loading.borrow().contains(&partition) {
                return Err(COORDINATOR_LOAD_IN_PROGRESS);
            }
            f(t, partition).await
        }
        .boxed_local()
    })
    .await
    .unwrap_or(Err(COORDINATOR_NOT_AVAILABLE))
}

/// InitProducerId for a transactional producer (called by `init_producer_id`).
pub async fn init_producer_id(req: &InitProducerIdRequest) -> Result<(i64, i16), i16> {
    let id = req
        .transactional_id
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let timeout = req.transaction_timeout_ms;
    let expected = (req.producer_id.0, req.producer_epoch);
    let key = id.clone();
    on_coordinator(&key, move |s, partition| {
        async move { txn::init_producer_id(&s, partition, &id, timeout, expected).await }
            .boxed_local()
    })
    .await
}

pub async fn handle_add_partitions(frame: RequestFrame) -> Result<Response, String> {
    let req: AddPartitionsToTxnRequest = decode(&frame)?;
    let s = shard();
    let image = s.image();
    let mut parts = Vec::new();
    let mut unknown = false;
    for t in &req.v3_and_below_topics {
        for p in &t.partitions {
            let exists = image
                .topics
                .get(t.name.0.as_str())
                .is_some_and(|tm| *p >= 0 && (*p as usize) < tm.partitions.len());
            unknown |= !exists;
            parts.push((t.name.0.to_string(), *p, exists));
        }
    }
    let code = if unknown {
        None
    } else {
        let id = req.v3_and_below_transactional_id.0.to_string();
        let (pid, epoch) = (
            req.v3_and_below_producer_id.0,
            req.v3_and_below_producer_epoch,
        );
        let list: Vec<(String, i32)> = parts.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
        let key = id.clone();
        Some(
            on_coordinator(&key, move |s, partition| {
                async move { txn::add_partitions(&s, partition, &id, pid, epoch, list).await }
                    .boxed_local()
            })
            .await
            .err()
            .unwrap_or(NONE),
        )
    };
    // An unknown partition fails the request: the others were not attempted.
    let code_of = |exists: bool| match code {
        Some(c) => c,
        None if exists => OPERATION_NOT_ATTEMPTED,
        None => UNKNOWN_TOPIC_OR_PARTITION,
    };
    let results = by_topic(parts.into_iter().map(|(t, p, exists)| (t, (p, exists))))
        .into_iter()
        .map(|(t, ps)| {
            AddPartitionsToTxnTopicResult::default()
                .with_name(TopicName(StrBytes::from_string(t)))
                .with_results_by_partition(
                    ps.into_iter()
                        .map(|(p, exists)| {
                            AddPartitionsToTxnPartitionResult::default()
                                .with_partition_index(p)
                                .with_partition_error_code(code_of(exists))
                        })
                        .collect(),
                )
        })
        .collect();
    let resp = AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(results);
    respond(&frame, OutBuf::new(), &resp)
}

pub async fn handle_add_offsets(frame: RequestFrame) -> Result<Response, String> {
    let req: AddOffsetsToTxnRequest = decode(&frame)?;
    let s = shard();
    let id = req.transactional_id.0.to_string();
    let (pid, epoch) = (req.producer_id.0, req.producer_epoch);
    let offsets =
        crate::group::records::partition_for(&req.group_id.0, s.config.group.offsets_partitions);
    let key = id.clone();
    let code = on_coordinator(&key, move |s, partition| {
        async move {
            let parts = vec![(crate::group::OFFSETS_TOPIC.to_string(), offsets)];
            txn::add_partitions(&s, partition, &id, pid, epoch, parts).await
        }
        .boxed_local()
    })
    .await
    .err()
    .unwrap_or(NONE);
    respond(
        &frame,
        OutBuf::new(),
        &AddOffsetsToTxnResponse::default().with_error_code(code),
    )
}

pub async fn handle_end_txn(frame: RequestFrame) -> Result<Response, String> {
    let req: EndTxnRequest = decode(&frame)?;
    let id = req.transactional_id.0.to_string();
    let (pid, epoch, commit) = (req.producer_id.0, req.producer_epoch, req.committed);
    let key = id.clone();
    let code = on_coordinator(&key, move |s, partition| {
        async move { txn::end_txn(&s, partition, &id, pid, epoch, commit).await }.boxed_local()
    })
    .await
    .err()
    .unwrap_or(NONE);
    respond(
        &frame,
        OutBuf::new(),
        &EndTxnResponse::default().with_error_code(code),
    )
}

/// WriteTxnMarkers from another broker's transaction coordinator: each marker goes to the
/// partitions this broker leads; answered once durable and replicated.
pub async fn handle_write_markers(frame: RequestFrame) -> Result<Response, String> {
    let req: WriteTxnMarkersRequest = decode(&frame)?;
    let s = shard();
    let mut out = Vec::with_capacity(req.markers.len());
    for m in req.markers {
        let tps: Vec<(String, i32)> = m
            .topics
            .iter()
            .flat_map(|t| {
                t.partition_indexes
                    .iter()
                    .map(|p| (t.name.0.to_string(), *p))
            })
            .collect();
        let codes = txn::write_local(
            &s,
            m.producer_id.0,
            m.producer_epoch,
            m.coordinator_epoch,
            m.transaction_result,
            &tps,
        )
        .await;
        let topics = by_topic(
            tps.into_iter()
                .zip(codes)
                .map(|((t, p), code)| (t, (p, code))),
        )
        .into_iter()
        .map(|(t, ps)| {
            WritableTxnMarkerTopicResult::default()
                .with_name(TopicName(StrBytes::from_string(t)))
                .with_partitions(
                    ps.into_iter()
                        .map(|(p, code)| {
                            WritableTxnMarkerPartitionResult::default()
                                .with_partition_index(p)
                                .with_error_code(code)
                        })
                        .collect(),
                )
        })
        .collect();
        out.push(
            WritableTxnMarkerResult::default()
                .with_producer_id(m.producer_id)
                .with_topics(topics),
        );
    }
    respond(
        &frame,
        OutBuf::new(),
        &WriteTxnMarkersResponse::default().with_markers(out),
    )
}

pub async fn handle_describe(frame: RequestFrame) -> Result<Response, String> {
    let req: DescribeTransactionsRequest = decode(&frame)?;
    let mut states = Vec::with_capacity(req.transactional_ids.len());
    for id in req.transactional_ids {
        let key = id.0.to_string();
        let k = key.clone();
        let r = on_coordinator(&k, move |s, _| {
            async move { s.txns.get(&key).ok_or(TRANSACTIONAL_ID_NOT_FOUND) }.boxed_local()
        })
        .await;
        let st = TransactionState::default().with_transactional_id(id);
        states.push(match r {
            Err(code) => st
                .with_error_code(code)
                .with_transaction_state(StrBytes::from_static_str("")),
            Ok(v) => {
                let topics = by_topic(v.partitions.iter().map(|(t, p)| (t, *p)))
                    .into_iter()
                    .map(|(t, ps)| {
                        TopicData::default()
                            .with_topic(TopicName(StrBytes::from_string(t.clone())))
                            .with_partitions(ps)
                    })
                    .collect();
                st.with_transaction_state(StrBytes::from_static_str(v.state.name()))
                    .with_transaction_timeout_ms(v.timeout_ms)
                    .with_transaction_start_time_ms(v.start_ms)
                    .with_producer_id(ProducerId(v.producer_id))
                    .with_producer_epoch(v.epoch)
                    .with_topics(topics)
            }
        });
    }
    respond(
        &frame,
        OutBuf::new(),
        &DescribeTransactionsResponse::default().with_transaction_states(states),
    )
}

const STATES: [TxnState; 8] = [
    TxnState::Empty,
    TxnState::Ongoing,
    TxnState::PrepareCommit,
    TxnState::PrepareAbort,
    TxnState::CompleteCommit,
    TxnState::CompleteAbort,
    TxnState::Dead,
    TxnState::PrepareEpochFence,
];

pub async fn handle_list(frame: RequestFrame) -> Result<Response, String> {
    let req: ListTransactionsRequest = decode(&frame)?;
    let s = shard();
    let unknown: Vec<StrBytes> = req
        .state_filters
        .iter()
        .filter(|f| !STATES.iter().any(|st| st.name() == f.as_str()))
        .cloned()
        .collect();
    let states: Vec<String> = req.state_filters.iter().map(|f| f.to_string()).collect();
    let pids: Vec<i64> = req.producer_id_filters.iter().map(|p| p.0).collect();
    let min_age_ms = if frame.api_version >= 1 {
        req.duration_filter
    } else {
        -1
    };
    let mut listed = Vec::new();
    for target in 0..s.count {
        let (states, pids) = (states.clone(), pids.clone());
        let got = s
            .run_on(target, move |t| {
                async move {
                    let now = crate::storage::log::now_ms();
                    let image = t.image();
                    t.txns
                        .txns
                        .borrow()
                        .iter()
                        .filter(|(id, _)| {
                            // Only the ids this broker coordinates.
                            let p = txn::partition_for(id, t.config.txn.partitions);
                            image.route(TXN_TOPIC, p, t.config.node_id).is_ok()
                        })
                        .filter(|(_, v)| {
                            states.is_empty() || states.iter().any(|f| f == v.state.name())
                        })
                        .filter(|(_, v)| pids.is_empty() || pids.contains(&v.producer_id))
                        .filter(|(_, v)| {
                            min_age_ms < 0 || (v.start_ms >= 0 && now - v.start_ms >= min_age_ms)
                        })
                        .map(|(id, v)| (id.clone(), v.producer_id, v.state.name()))
                        .collect::<Vec<_>>()
                }
                .boxed_local()
            })
            .await
            .unwrap_or_default();
        listed.extend(got);
    }
    let resp = ListTransactionsResponse::default()
        .with_unknown_state_filters(unknown)
        .with_transaction_states(
            listed
                .into_iter()
                .map(|(id, pid, st)| {
                    ListedState::default()
                        .with_transactional_id(TransactionalId(StrBytes::from_string(id)))
                        .with_producer_id(ProducerId(pid))
                        .with_transaction_state(StrBytes::from_static_str(st))
                })
                .collect(),
        );
    respond(&frame, OutBuf::new(), &resp)
}
