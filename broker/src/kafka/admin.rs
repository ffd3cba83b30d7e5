//! CreateTopics v2-7 (v6 only adds a quota error Weir never gives, v7 the topic id),
//! DeleteTopics v1-6 (v5: error messages; v6: topics by name or topic id), CreatePartitions v0-3
//! (v3 only adds a quota error) and DescribeConfigs v1-4.
//! Changes go to the controller shard; errors are Kafka's codes and messages.

use std::collections::{BTreeMap, HashMap};

use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::{
    CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Response};
use crate::cluster::controller;
use crate::cluster::metadata::{NewTopic, TopicError};
use crate::config::TOPIC_CONFIG_KEYS;
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::{shard, ControlOp};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_DYNAMIC_TOPIC: i8 = 1;
const SOURCE_DYNAMIC_BROKER: i8 = 2;
const SOURCE_DYNAMIC_DEFAULT_BROKER: i8 = 3;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;
const CONFIG_TYPE_STRING: i8 = 2;
const CONFIG_TYPE_INT: i8 = 3;
const CONFIG_TYPE_LONG: i8 = 5;
const CONFIG_TYPE_LIST: i8 = 7;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

fn names_seen_twice<'a>(names: impl Iterator<Item = &'a str>) -> std::collections::HashSet<String> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for n in names {
        *count.entry(n).or_default() += 1;
    }
    count
        .into_iter()
        .filter(|&(_, c)| c > 1)
        .map(|(n, _)| n.to_string())
        .collect()
}

pub async fn handle_create_topics(frame: RequestFrame) -> Result<Response, String> {
    let req: CreateTopicsRequest = decode(&frame)?;
    let sh = shard();
    let dupes = names_seen_twice(req.topics.iter().map(|t| t.name.0.as_str()));
    let mut results: Vec<Option<Result<(i32, i16), TopicError>>> =
        Vec::with_capacity(req.topics.len());
    let mut asks = Vec::new();
    for t in &req.topics {
        let name = t.name.0.to_string();
        if dupes.contains(&name) {
            results.push(Some(Err(TopicError::InvalidRequest(format!(
                "Create topic request contains duplicate topic name {name}"
            )))));
            continue;
        }
        let mut configs = BTreeMap::new();
        let mut bad = None;
        for c in &t.configs {
            match &c.value {
                Some(v) => {
                    configs.insert(c.name.to_string(), v.to_string());
                }
                None => {
                    bad = Some(format!(
                        "Null value not supported for topic config {}",
                        c.name.as_str()
                    ))
                }
            }
        }
        if let Some(m) = bad {
            results.push(Some(Err(TopicError::InvalidConfig(m))));
            continue;
        }
        results.push(None);
        asks.push(NewTopic {
            name,
            num_partitions: t.num_partitions,
            replication_factor: t.replication_factor,
            configs,
            assignments: t
                .assignments
                .iter()
                .map(|a| {
                    (
                        a.partition_index,
                        a.broker_ids.iter().map(|b| b.0).collect(),
                    )
                })
                .collect(),
        });
    }
    let mut answers = if asks.is_empty() {
        Vec::new()
    } else {
        controller::request(&sh, ControlOp::CreateTopics(asks, req.validate_only))
            .await
            .unwrap_or_default()
    }
    .into_iter();
    let image = sh.image();
    let mut topics = Vec::with_capacity(req.topics.len());
    for (t, r) in req.topics.iter().zip(results) {
        let r = r
            .or_else(|| answers.next())
            .unwrap_or(Err(TopicError::InvalidRequest(
                "the controller is unavailable".into(),
            )));
        let name = t.name.0.to_string();
        let mut out = CreatableTopicResult::default().with_name(t.name.clone());
        match r {
            Ok((partitions, rf)) => {
                out = out.with_error_code(NONE);
                // v7 (KIP-516): the new topic's id. The local image has the topic once the
                // controller answered (a forwarded change waits for it); validate_only
                // creates nothing, so no id.
                if frame.api_version >= 7 && !req.validate_only {
                    out = out
                        .with_topic_id(image.topics.get(&name).map(|m| m.id).unwrap_or_default());
                }
                if frame.api_version >= 5 {
                    let cfg = image.log_config(&sh.config.log, &name);
                    let overrides = image
                        .topics
                        .get(&name)
                        .map(|m| m.configs.clone())
                        .unwrap_or_default();
                    out = out
                        .with_num_partitions(partitions)
                        .with_replication_factor(rf)
                        .with_configs(Some(
                            TOPIC_CONFIG_KEYS
                                .iter()
                                .filter_map(|k| cfg.describe(k).map(|v| (k, v)))
                                .map(|(k, v)| {
                                    CreatableTopicConfigs::default()
                                        .with_name(s(*k))
                                        .with_value(Some(s(v)))
                                        .with_config_source(if overrides.contains_key(*k) {
                                            SOURCE_DYNAMIC_TOPIC
                                        } else {
                                            SOURCE_DEFAULT
                                        })
                                })
                                .collect(),
                        ));
                }
            }
            Err(e) => {
                out = out
                    .with_error_code(e.code())
                    .with_error_message(Some(s(e.message())));
                if frame.api_version >= 5 {
                    out = out
                        .with_num_partitions(-1)
                        .with_replication_factor(-1)
                        .with_configs(None);
                }
            }
        }
        topics.push(out);
    }
    respond(
        &frame,
        OutBuf::new(),
        &CreateTopicsResponse::default().with_topics(topics),
    )
}

/// One topic a DeleteTopics request names: by name (v1-6) or by topic id (v6).
struct Deletion {
    name: Option<String>,
    id: uuid::Uuid,
    /// Refused before reaching the controller: (code, message).
    error: Option<(i16, String)>,
}

/// The topics a DeleteTopics request names, with the errors known before asking the
/// controller, as Kafka's: neither or both of name and id, a name or an id given twice, an id
/// the image does not know (UNKNOWN_TOPIC_ID). Ids are resolved to names here.
fn deletions(
    image: &crate::cluster::metadata::Image,
    version: i16,
    req: &DeleteTopicsRequest,
) -> Vec<Deletion> {
    let mut out: Vec<Deletion> = if version >= 6 {
        req.topics
            .iter()
            .map(|t| {
                let name = t.name.as_ref().map(|n| n.0.to_string());
                let error = match (&name, t.topic_id.is_nil()) {
                    (None, true) => Some((
                        INVALID_REQUEST,
                        "Neither topic name nor id were specified.".to_string(),
                    )),
                    (Some(_), false) => Some((
                        INVALID_REQUEST,
                        "You may not specify both topic name and topic id.".to_string(),
                    )),
                    _ => None,
                };
                Deletion {
                    name,
                    id: t.topic_id,
                    error,
                }
            })
            .collect()
    } else {
        req.topic_names
            .iter()
            .map(|n| Deletion {
                name: Some(n.0.to_string()),
                id: uuid::Uuid::nil(),
                error: None,
            })
            .collect()
    };
    let dupe_names = names_seen_twice(
        out.iter()
            .filter(|d| d.error.is_none() && d.id.is_nil())
            .filter_map(|d| d.name.as_deref()),
    );
    let mut ids_seen: HashMap<uuid::Uuid, usize> = HashMap::new();
    for d in out.iter().filter(|d| d.error.is_none() && !d.id.is_nil()) {
        *ids_seen.entry(d.id).or_default() += 1;
    }
    for d in out.iter_mut().filter(|d| d.error.is_none()) {
        if d.id.is_nil() {
            let name = d.name.as_deref().unwrap_or_default();
            if dupe_names.contains(name) {
                d.error = Some((INVALID_REQUEST, "Duplicate topic name.".into()));
            } else if version >= 6 {
                d.id = image.topics.get(name).map(|t| t.id).unwrap_or_default();
            }
        } else if ids_seen[&d.id] > 1 {
            d.error = Some((INVALID_REQUEST, "Duplicate topic id.".into()));
        } else {
            match image.topic_by_id(d.id) {
                Some((name, _)) => d.name = Some(name.clone()),
                None => {
                    d.error = Some((
                        UNKNOWN_TOPIC_ID,
                        format!("Topic id {} does not exist.", d.id),
                    ))
                }
            }
        }
    }
    out
}

pub async fn handle_delete_topics(frame: RequestFrame) -> Result<Response, String> {
    let req: DeleteTopicsRequest = decode(&frame)?;
    let sh = shard();
    let version = frame.api_version;
    let topics = deletions(&sh.image(), version, &req);
    let asks: Vec<String> = topics
        .iter()
        .filter(|d| d.error.is_none())
        .filter_map(|d| d.name.clone())
        .collect();
    let mut answers = if asks.is_empty() {
        Vec::new()
    } else {
        controller::request(&sh, ControlOp::DeleteTopics(asks))
            .await
            .unwrap_or_default()
    }
    .into_iter();
    let mut responses = Vec::with_capacity(topics.len());
    for d in topics {
        let (code, message) = match d.error {
            Some((code, message)) => (code, Some(message)),
            None => match answers.next() {
                Some(Ok(_)) => (NONE, None),
                Some(Err(e)) => (e.code(), Some(e.message())),
                None => (UNKNOWN_SERVER_ERROR, None),
            },
        };
        responses.push(
            DeletableTopicResult::default()
                .with_name(d.name.map(|n| TopicName(s(n))))
                .with_topic_id(d.id)
                .with_error_code(code)
                .with_error_message(message.filter(|_| version >= 5).map(s)),
        );
    }
    respond(
        &frame,
        OutBuf::new(),
        &DeleteTopicsResponse::default().with_responses(responses),
    )
}

pub async fn handle_create_partitions(frame: RequestFrame) -> Result<Response, String> {
    let req: CreatePartitionsRequest = decode(&frame)?;
    let sh = shard();
    let node = sh.config.node_id;
    let dupes = names_seen_twice(req.topics.iter().map(|t| t.name.0.as_str()));
    let mut early: Vec<Option<TopicError>> = Vec::with_capacity(req.topics.len());
    let mut asks = Vec::new();
    for t in &req.topics {
        let name = t.name.0.to_string();
        let bad_assignment = t
            .assignments
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x.broker_ids.iter().any(|b| b.0 != node)));
        if dupes.contains(&name) {
            early.push(Some(TopicError::InvalidRequest(format!(
                "Duplicate topic {name} in the request"
            ))));
        } else if bad_assignment {
            early.push(Some(TopicError::InvalidRequest(format!(
                "Replica assignments may only name broker {node}"
            ))));
        } else {
            early.push(None);
            asks.push((name, t.count));
        }
    }
    let mut answers = if asks.is_empty() {
        Vec::new()
    } else {
        controller::request(&sh, ControlOp::CreatePartitions(asks, req.validate_only))
            .await
            .unwrap_or_default()
    }
    .into_iter();
    let results = req
        .topics
        .iter()
        .zip(early)
        .map(|(t, e)| {
            let r = match e {
                Some(e) => Err(e),
                None => answers.next().unwrap_or(Err(TopicError::InvalidRequest(
                    "the controller is unavailable".into(),
                ))),
            };
            let out = CreatePartitionsTopicResult::default().with_name(t.name.clone());
            match r {
                Ok(_) => out.with_error_code(NONE),
                Err(e) => out
                    .with_error_code(e.code())
                    .with_error_message(Some(s(e.message()))),
            }
        })
        .collect();
    respond(
        &frame,
        OutBuf::new(),
        &CreatePartitionsResponse::default().with_results(results),
    )
}

fn topic_config_type(key: &str) -> i8 {
    match key {
        "retention.ms" | "retention.bytes" | "segment.ms" => CONFIG_TYPE_LONG,
        "segment.bytes"
        | "segment.index.bytes"
        | "index.interval.bytes"
        | "max.message.bytes"
        | "min.insync.replicas" => CONFIG_TYPE_INT,
        "cleanup.policy"
        | "leader.replication.throttled.replicas"
        | "follower.replication.throttled.replicas" => CONFIG_TYPE_LIST,
        _ => CONFIG_TYPE_STRING,
    }
}

pub fn handle_describe_configs(frame: RequestFrame) -> Result<Response, String> {
    let req: DescribeConfigsRequest = decode(&frame)?;
    let sh = shard();
    let image = sh.image();
    let c = &sh.config;
    let wanted = |keys: &Option<Vec<StrBytes>>, k: &str| {
        keys.as_ref()
            .is_none_or(|ks| ks.iter().any(|x| x.as_str() == k))
    };
    let entry = |k: &str, v: String, source: i8, ty: i8| {
        DescribeConfigsResourceResult::default()
            .with_name(s(k))
            .with_value(Some(s(v)))
            .with_read_only(false)
            .with_config_source(source)
            .with_is_sensitive(false)
            .with_config_type(if frame.api_version >= 3 { ty } else { 0 })
    };
    let mut results = Vec::with_capacity(req.resources.len());
    for r in &req.resources {
        let mut out = DescribeConfigsResult::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name.clone());
        match r.resource_type {
            RESOURCE_TOPIC => match image.topics.get(r.resource_name.as_str()) {
                None => {
                    out = out
                        .with_error_code(UNKNOWN_TOPIC_OR_PARTITION)
                        .with_error_message(Some(s(format!(
                            "Topic {} does not exist",
                            r.resource_name.as_str()
                        ))));
                }
                Some(t) => {
                    let cfg = image.log_config(&c.log, r.resource_name.as_str());
                    // Topic keys whose default was changed for the whole cluster.
                    let dynamic_default = |k: &str| {
                        image.broker_configs.get("").is_some_and(|m| {
                            m.keys()
                                .any(|b| crate::config::cluster_log_key(b) == Some(k))
                        })
                    };
                    out.configs = TOPIC_CONFIG_KEYS
                        .iter()
                        .filter(|k| wanted(&r.configuration_keys, k))
                        .filter_map(|k| {
                            let source = if t.configs.contains_key(*k) {
                                SOURCE_DYNAMIC_TOPIC
                            } else if dynamic_default(k) {
                                SOURCE_DYNAMIC_DEFAULT_BROKER
                            } else {
                                SOURCE_DEFAULT
                            };
                            cfg.describe(k)
                                .map(|v| entry(k, v, source, topic_config_type(k)))
                        })
                        .collect();
                }
            },
            RESOURCE_BROKER => {
                let name = r.resource_name.as_str();
                if name.is_empty() {
                    // The cluster-wide default resource lists only what was set on it.
                    out.configs = image
                        .broker_configs
                        .get("")
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| wanted(&r.configuration_keys, k))
                        .map(|(k, v)| {
                            let ty = c
                                .broker_entries()
                                .into_iter()
                                .find(|(name, _, _)| name == k)
                                .map_or(CONFIG_TYPE_LONG, |(_, _, ty)| ty);
                            entry(k, v.clone(), SOURCE_DYNAMIC_DEFAULT_BROKER, ty)
                        })
                        .collect();
                } else if name != c.node_id.to_string() {
                    out = out
                        .with_error_code(INVALID_REQUEST)
                        .with_error_message(Some(s(format!(
                        "Unexpected broker id, expected {} or empty string, but received {name}",
                        c.node_id
                    ))));
                } else {
                    let synonyms = frame.api_version >= 1 && req.include_synonyms;
                    let syn = |k: &str, v: &str, source: i8| {
                        kafka_protocol::messages::describe_configs_response::DescribeConfigsSynonym::default()
                            .with_name(s(k))
                            .with_value(Some(s(v)))
                            .with_source(source)
                    };
                    // What each key would be with nothing set (the DEFAULT_CONFIG synonym).
                    let defaults: std::collections::HashMap<&str, String> =
                        crate::config::Config::new(
                            "127.0.0.1:9092".parse().expect("an address"),
                            "./data".into(),
                            c.shards,
                        )
                        .broker_entries()
                        .into_iter()
                        .map(|(k, v, _)| (k, v))
                        .collect();
                    let cluster_default = image.broker_configs.get("");
                    for (k, v, ty) in c.broker_entries() {
                        if !wanted(&r.configuration_keys, k) {
                            continue;
                        }
                        let given = c.given.contains(k);
                        let dynamic = crate::config::cluster_log_key(k).is_some();
                        let set = cluster_default.and_then(|m| m.get(k)).filter(|_| dynamic);
                        let mut e = match set {
                            Some(d) => entry(k, d.clone(), SOURCE_DYNAMIC_DEFAULT_BROKER, ty),
                            None if given => entry(k, v.clone(), SOURCE_STATIC_BROKER, ty),
                            None => entry(k, v.clone(), SOURCE_DEFAULT, ty),
                        }
                        .with_read_only(!dynamic);
                        if synonyms {
                            if let Some(d) = set {
                                e.synonyms.push(syn(k, d, SOURCE_DYNAMIC_DEFAULT_BROKER));
                            }
                            if given {
                                e.synonyms.push(syn(k, &v, SOURCE_STATIC_BROKER));
                            }
                            let d = defaults.get(k).cloned().unwrap_or_default();
                            e.synonyms.push(syn(k, &d, SOURCE_DEFAULT));
                        }
                        out.configs.push(e);
                    }
                    for k in crate::config::BROKER_DYNAMIC_CONFIG_KEYS {
                        if !wanted(&r.configuration_keys, k) {
                            continue;
                        }
                        let own = image
                            .broker_configs
                            .get(&c.node_id.to_string())
                            .and_then(|m| m.get(*k));
                        let default = image.broker_configs.get("").and_then(|m| m.get(*k));
                        let fallback = crate::config::THROTTLED_RATE_DEFAULT.to_string();
                        let (v, source) = match (own, default) {
                            (Some(v), _) => (v.clone(), SOURCE_DYNAMIC_BROKER),
                            (None, Some(v)) => (v.clone(), SOURCE_DYNAMIC_DEFAULT_BROKER),
                            (None, None) => (fallback.clone(), SOURCE_DEFAULT),
                        };
                        let mut e = entry(k, v, source, CONFIG_TYPE_LONG);
                        if synonyms {
                            if let Some(v) = own {
                                e.synonyms.push(syn(k, v, SOURCE_DYNAMIC_BROKER));
                            }
                            if let Some(v) = default {
                                e.synonyms.push(syn(k, v, SOURCE_DYNAMIC_DEFAULT_BROKER));
                            }
                            e.synonyms.push(syn(k, &fallback, SOURCE_DEFAULT));
                        }
                        out.configs.push(e);
                    }
                }
            }
            other => {
                out = out
                    .with_error_code(INVALID_REQUEST)
                    .with_error_message(Some(s(format!(
                        "Resource type {other} is not supported by Weir"
                    ))));
            }
        }
        results.push(out);
    }
    respond(
        &frame,
        OutBuf::new(),
        &DescribeConfigsResponse::default().with_results(results),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::metadata::{Image, TopicMeta};
    use kafka_protocol::messages::delete_topics_request::DeleteTopicState;

    #[test]
    fn deletions_resolve_ids_and_refuse_as_kafka() {
        let mut image = Image::default();
        image.topics.insert(
            "a".into(),
            TopicMeta {
                id: uuid::Uuid::from_u128(1),
                partitions: vec![],
                configs: Default::default(),
                internal: false,
            },
        );
        let t = |name: Option<&str>, id: u128| {
            DeleteTopicState::default()
                .with_name(name.map(|n| TopicName(s(n))))
                .with_topic_id(uuid::Uuid::from_u128(id))
        };
        let req = DeleteTopicsRequest::default().with_topics(vec![
            t(None, 1),
            t(Some("b"), 0),
            t(None, 0),
            t(Some("a"), 1),
            t(None, 9),
            t(Some("c"), 0),
            t(Some("c"), 0),
        ]);
        let got: Vec<_> = deletions(&image, 6, &req)
            .into_iter()
            .map(|d| (d.name, d.id.as_u128(), d.error.map(|e| e.0)))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("a".into()), 1, None),
                (Some("b".into()), 0, None),
                (None, 0, Some(INVALID_REQUEST)),
                (Some("a".into()), 1, Some(INVALID_REQUEST)),
                (None, 9, Some(UNKNOWN_TOPIC_ID)),
                (Some("c".into()), 0, Some(INVALID_REQUEST)),
                (Some("c".into()), 0, Some(INVALID_REQUEST)),
            ]
        );
        // Before v6 only names count; they get no ids.
        let req = DeleteTopicsRequest::default().with_topic_names(vec![TopicName(s("a"))]);
        let d = &deletions(&image, 5, &req)[0];
        assert_eq!(
            (d.name.as_deref(), d.id.is_nil(), d.error.is_none()),
            (Some("a"), true, true)
        );
    }
}
