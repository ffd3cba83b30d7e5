//! CreateTopics v2-5, DeleteTopics v1-4, CreatePartitions v0-2 and DescribeConfigs v1-4.
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

pub async fn handle_delete_topics(frame: RequestFrame) -> Result<Response, String> {
    let req: DeleteTopicsRequest = decode(&frame)?;
    let sh = shard();
    let names: Vec<String> = req.topic_names.iter().map(|n| n.0.to_string()).collect();
    let dupes = names_seen_twice(names.iter().map(|n| n.as_str()));
    let asks: Vec<String> = names
        .iter()
        .filter(|n| !dupes.contains(*n))
        .cloned()
        .collect();
    let mut answers = if asks.is_empty() {
        Vec::new()
    } else {
        controller::request(&sh, ControlOp::DeleteTopics(asks))
            .await
            .unwrap_or_default()
    }
    .into_iter();
    let mut responses = Vec::with_capacity(names.len());
    for (name, raw) in names.iter().zip(req.topic_names) {
        let code = if dupes.contains(name) {
            INVALID_REQUEST
        } else {
            match answers.next() {
                Some(Ok(_)) => NONE,
                Some(Err(e)) => e.code(),
                None => UNKNOWN_SERVER_ERROR,
            }
        };
        responses.push(
            DeletableTopicResult::default()
                .with_name(Some(raw))
                .with_error_code(code),
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
