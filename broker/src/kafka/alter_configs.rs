//! AlterConfigs v0-2 (the given overrides replace a topic's) and IncrementalAlterConfigs v0-1
//! (SET, DELETE, APPEND, SUBTRACT per key) for TOPIC resources. The controller resolves the
//! edit against the current image, validates the result as CreateTopics does (INVALID_CONFIG
//! with Kafka-style messages), persists it and sends it to every shard, whose open logs take the
//! new settings at once. BROKER resources carry dynamic broker configs (KIP-226, the keys of
//! `config::BROKER_DYNAMIC_CONFIG_KEYS`), for this broker or the cluster-wide default (""),
//! persisted in the metadata the same way.

use std::collections::{BTreeMap, HashSet};

use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, IncrementalAlterConfigsRequest,
    IncrementalAlterConfigsResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Response};
use crate::cluster::controller;
use crate::cluster::metadata::TopicError;
use crate::config::ConfigEdit;
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::{shard, ControlOp};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;

/// One response entry per request resource, for either API's generated response type (the
/// two have the same fields but are different types).
macro_rules! resource_responses {
    ($ty:ty, $resources:expr, $results:expr) => {
        $resources
            .iter()
            .zip($results)
            .map(|(r, (code, msg))| {
                <$ty>::default()
                    .with_error_code(code)
                    .with_error_message(msg.map(StrBytes::from_string))
                    .with_resource_type(r.resource_type)
                    .with_resource_name(r.resource_name.clone())
            })
            .collect()
    };
}

/// (resource type, name, edit) in request order -> (error code, message) per resource.
/// Topic resources go to the controller as one AlterTopicConfigs, broker resources as one
/// AlterBrokerConfigs; a broker resource must name this broker or be "" (the cluster-wide
/// default), as Kafka checks before forwarding.
async fn alter(
    resources: Vec<(i8, String, Result<ConfigEdit, TopicError>)>,
    validate_only: bool,
) -> Vec<(i16, Option<String>)> {
    let sh = shard();
    let me = sh.config.node_id;
    let mut seen = HashSet::new();
    // Per resource: an early answer, or which ask list (topic: false, broker: true) holds it.
    let mut answers: Vec<Result<bool, TopicError>> = Vec::with_capacity(resources.len());
    let mut topic_asks = Vec::new();
    let mut broker_asks = Vec::new();
    for (ty, name, edit) in resources {
        let early = if !seen.insert((ty, name.clone())) {
            Err(TopicError::InvalidRequest(format!(
                "Duplicate resource {name} in the request"
            )))
        } else if ty == RESOURCE_BROKER {
            match name.parse::<i32>() {
                _ if name.is_empty() => Ok(()),
                Ok(id) if id == me => Ok(()),
                Ok(id) => Err(TopicError::InvalidRequest(format!(
                    "Unexpected broker id, expected {me}, but received {id}"
                ))),
                Err(_) => Err(TopicError::InvalidRequest(format!(
                    "Broker id must be an integer, but it is: {name}"
                ))),
            }
        } else if ty != RESOURCE_TOPIC {
            Err(TopicError::InvalidRequest(format!(
                "Unsupported resource type {ty}"
            )))
        } else {
            Ok(())
        };
        answers.push(early.and(edit).map(|edit| {
            if ty == RESOURCE_BROKER {
                broker_asks.push((name, edit));
                true
            } else {
                topic_asks.push((name, edit));
                false
            }
        }));
    }
    let ask = |op: ControlOp, n: usize| {
        let sh = sh.clone();
        async move {
            if n == 0 {
                return Vec::new();
            }
            controller::request(&sh, op).await.unwrap_or_default()
        }
    };
    let (nt, nb) = (topic_asks.len(), broker_asks.len());
    let mut topic_replies = ask(ControlOp::AlterTopicConfigs(topic_asks, validate_only), nt)
        .await
        .into_iter();
    let mut broker_replies = ask(
        ControlOp::AlterBrokerConfigs(broker_asks, validate_only),
        nb,
    )
    .await
    .into_iter();
    answers
        .into_iter()
        .map(|a| {
            let r = a.and_then(|broker| {
                let next = if broker {
                    broker_replies.next()
                } else {
                    topic_replies.next()
                };
                next.map(|r| r.map(|_| ()))
                    .unwrap_or(Err(TopicError::InvalidRequest(
                        "The controller did not answer".into(),
                    )))
            });
            match r {
                Ok(()) => (NONE, None),
                Err(e) => (e.code(), Some(e.message())),
            }
        })
        .collect()
}

pub async fn handle_alter_configs(frame: RequestFrame) -> Result<Response, String> {
    let req: AlterConfigsRequest = decode(&frame)?;
    let resources = req
        .resources
        .iter()
        .map(|r| {
            let mut all = BTreeMap::new();
            let mut bad = None;
            for c in &r.configs {
                match &c.value {
                    Some(v) => {
                        all.insert(c.name.to_string(), v.to_string());
                    }
                    None => {
                        bad = Some(TopicError::InvalidConfig(format!(
                            "Null value not supported for config {}",
                            c.name.as_str()
                        )))
                    }
                }
            }
            let edit = match bad {
                Some(e) => Err(e),
                None => Ok(ConfigEdit::Replace(all)),
            };
            (r.resource_type, r.resource_name.to_string(), edit)
        })
        .collect();
    let results = alter(resources, req.validate_only).await;
    let resp = AlterConfigsResponse::default().with_responses(resource_responses!(
        kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse,
        req.resources,
        results
    ));
    respond(&frame, OutBuf::new(), &resp)
}

pub async fn handle_incremental_alter_configs(frame: RequestFrame) -> Result<Response, String> {
    let req: IncrementalAlterConfigsRequest = decode(&frame)?;
    let resources = req
        .resources
        .iter()
        .map(|r| {
            let ops = r
                .configs
                .iter()
                .map(|c| {
                    (
                        c.name.to_string(),
                        c.config_operation,
                        c.value.as_ref().map(|v| v.to_string()),
                    )
                })
                .collect();
            let mut keys = HashSet::new();
            let edit = if r.configs.iter().all(|c| keys.insert(c.name.as_str())) {
                Ok(ConfigEdit::Incremental(ops))
            } else {
                Err(TopicError::InvalidRequest(
                    "Error due to duplicate config keys".into(),
                ))
            };
            (r.resource_type, r.resource_name.to_string(), edit)
        })
        .collect();
    let results = alter(resources, req.validate_only).await;
    let resp = IncrementalAlterConfigsResponse::default().with_responses(resource_responses!(
        kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse,
        req.resources,
        results
    ));
    respond(&frame, OutBuf::new(), &resp)
}
