//! AlterConfigs v0-2 (the given overrides replace a topic's) and IncrementalAlterConfigs v0-1
//! (SET, DELETE, APPEND, SUBTRACT per key) for TOPIC resources. The controller resolves the
//! edit against the current image, validates the result as CreateTopics does (INVALID_CONFIG
//! with Kafka-style messages), persists it and sends it to every shard, whose open logs take the
//! new settings at once. Broker resources (dynamic broker configs) are not alterable yet: they
//! answer INVALID_REQUEST naming that.

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
async fn alter(
    resources: Vec<(i8, String, Result<ConfigEdit, TopicError>)>,
    validate_only: bool,
) -> Vec<(i16, Option<String>)> {
    let sh = shard();
    let mut seen = HashSet::new();
    let mut answers: Vec<Option<Result<(), TopicError>>> = Vec::with_capacity(resources.len());
    let mut asks = Vec::new();
    for (ty, name, edit) in resources {
        let early = if !seen.insert((ty, name.clone())) {
            Some(Err(TopicError::InvalidRequest(format!(
                "Duplicate resource {name} in the request"
            ))))
        } else if ty == RESOURCE_BROKER {
            Some(Err(TopicError::InvalidRequest(
                "Dynamic broker configs are not supported by Weir yet; set them in server.properties"
                    .into(),
            )))
        } else if ty != RESOURCE_TOPIC {
            Some(Err(TopicError::InvalidRequest(format!(
                "Unsupported resource type {ty}"
            ))))
        } else {
            match edit {
                Err(e) => Some(Err(e)),
                Ok(edit) => {
                    asks.push((name, edit));
                    None
                }
            }
        };
        answers.push(early);
    }
    let mut replies = if asks.is_empty() {
        Vec::new()
    } else {
        controller::request(&sh, ControlOp::AlterTopicConfigs(asks, validate_only))
            .await
            .unwrap_or_default()
    }
    .into_iter();
    answers
        .into_iter()
        .map(|a| {
            let r =
                a.unwrap_or_else(|| {
                    replies.next().map(|r| r.map(|_| ())).unwrap_or(Err(
                        TopicError::InvalidRequest("The controller did not answer".into()),
                    ))
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
                            "Null value not supported for topic config {}",
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
