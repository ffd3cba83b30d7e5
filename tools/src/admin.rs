//! The admin client: topics (create, delete, add partitions, describe), the cluster, and
//! consumer groups (list, describe with lag, reset offsets).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use crate::client::conn::Conn;
use crate::client::metadata::Cluster;
use crate::consumer::{list_offsets, TopicPartition};
use crate::{connect_any, error_name};

pub struct Admin {
    conn: Conn,
    timeout_ms: i32,
}

/// A group's committed offset and lag for one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub committed: Option<i64>,
    pub end: i64,
    pub lag: Option<i64>,
    pub owner: Option<String>,
}

#[derive(Clone, Debug)]
pub struct GroupDescription {
    pub state: String,
    pub protocol: String,
    pub members: Vec<(String, String, String)>,
    /// Who owns each assigned partition: (member id, client host, client id).
    pub owners: BTreeMap<TopicPartition, (String, String, String)>,
}

/// Kafka's ConfigResource types.
pub const RESOURCE_TOPIC: i8 = 2;
pub const RESOURCE_BROKER: i8 = 4;

/// DescribeConfigs of one resource (every key): (name, value, source), source being Kafka's
/// name (DYNAMIC_TOPIC_CONFIG, DEFAULT_CONFIG, ...).
pub fn describe_configs(
    conn: &mut Conn,
    resource_type: i8,
    name: &str,
) -> Result<Vec<(String, Option<String>, &'static str)>> {
    let (r, _): (DescribeConfigsResponse, i16) = conn.call(
        ApiKey::DescribeConfigs,
        4,
        &DescribeConfigsRequest::default().with_resources(vec![
            describe_configs_request::DescribeConfigsResource::default()
                .with_resource_type(resource_type)
                .with_resource_name(s(name))
                // null asks for every key; an empty list would ask for none.
                .with_configuration_keys(None),
        ]),
    )?;
    let res = r
        .results
        .first()
        .context("an empty DescribeConfigs response")?;
    check(
        res.error_code,
        res.error_message.as_ref(),
        &format!(
            "describing configs of {}",
            resource_label(resource_type, name)
        ),
    )?;
    Ok(res
        .configs
        .iter()
        .map(|c| {
            (
                c.name.to_string(),
                c.value.as_ref().map(|v| v.to_string()),
                config_source_name(c.config_source),
            )
        })
        .collect())
}

fn resource_label(resource_type: i8, name: &str) -> String {
    match resource_type {
        RESOURCE_TOPIC => format!("topic {name}"),
        RESOURCE_BROKER if name.is_empty() => "the default broker".into(),
        RESOURCE_BROKER => format!("broker {name}"),
        t => format!("resource {t}:{name}"),
    }
}

/// IncrementalAlterConfigs on one resource: `set` pairs are SET, `delete` keys are DELETE.
pub fn alter_configs(
    conn: &mut Conn,
    resource_type: i8,
    name: &str,
    set: &[(String, String)],
    delete: &[String],
) -> Result<()> {
    let mut ops: Vec<incremental_alter_configs_request::AlterableConfig> = set
        .iter()
        .map(|(k, v)| {
            incremental_alter_configs_request::AlterableConfig::default()
                .with_name(s(k))
                .with_config_operation(0)
                .with_value(Some(s(v)))
        })
        .collect();
    ops.extend(delete.iter().map(|k| {
        incremental_alter_configs_request::AlterableConfig::default()
            .with_name(s(k))
            .with_config_operation(1)
    }));
    let (r, _): (IncrementalAlterConfigsResponse, i16) = conn.call(
        ApiKey::IncrementalAlterConfigs,
        1,
        &IncrementalAlterConfigsRequest::default().with_resources(vec![
            incremental_alter_configs_request::AlterConfigsResource::default()
                .with_resource_type(resource_type)
                .with_resource_name(s(name))
                .with_configs(ops),
        ]),
    )?;
    let res = r
        .responses
        .first()
        .context("an empty IncrementalAlterConfigs response")?;
    check(
        res.error_code,
        res.error_message.as_ref(),
        &format!(
            "altering configs of {}",
            resource_label(resource_type, name)
        ),
    )
}

/// Kafka's names of DescribeConfigs' config sources, as kafka-configs.sh prints them.
fn config_source_name(source: i8) -> &'static str {
    match source {
        1 => "DYNAMIC_TOPIC_CONFIG",
        2 => "DYNAMIC_BROKER_CONFIG",
        3 => "DYNAMIC_DEFAULT_BROKER_CONFIG",
        4 => "STATIC_BROKER_CONFIG",
        5 => "DEFAULT_CONFIG",
        6 => "DYNAMIC_BROKER_LOGGER_CONFIG",
        7 => "CLIENT_METRICS_CONFIG",
        8 => "GROUP_CONFIG",
        _ => "UNKNOWN",
    }
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn check(code: i16, message: Option<&StrBytes>, what: &str) -> Result<()> {
    if code != 0 {
        match message {
            Some(m) if !m.is_empty() => bail!("{what}: {} ({})", error_name(code), m.as_str()),
            _ => bail!("{what}: {}", error_name(code)),
        }
    }
    Ok(())
}

impl Admin {
    pub fn connect(bootstrap: &str) -> Result<Admin> {
        Ok(Admin {
            conn: connect_any(bootstrap, "weir-admin", Duration::from_secs(30))?,
            timeout_ms: 30_000,
        })
    }

    pub fn create_topic(
        &mut self,
        name: &str,
        partitions: i32,
        replication_factor: i16,
        configs: &[(String, String)],
    ) -> Result<()> {
        let t = CreatableTopic::default()
            .with_name(TopicName(s(name)))
            .with_num_partitions(partitions)
            .with_replication_factor(replication_factor)
            .with_configs(
                configs
                    .iter()
                    .map(|(k, v)| {
                        CreatableTopicConfig::default()
                            .with_name(s(k))
                            .with_value(Some(s(v)))
                    })
                    .collect(),
            );
        let (r, _): (CreateTopicsResponse, i16) = self.conn.call(
            ApiKey::CreateTopics,
            5,
            &CreateTopicsRequest::default()
                .with_topics(vec![t])
                .with_timeout_ms(self.timeout_ms),
        )?;
        let t = &r.topics[0];
        check(
            t.error_code,
            t.error_message.as_ref(),
            &format!("creating topic {name}"),
        )
    }

    pub fn delete_topic(&mut self, name: &str) -> Result<()> {
        let (r, _): (DeleteTopicsResponse, i16) = self.conn.call(
            ApiKey::DeleteTopics,
            4,
            &DeleteTopicsRequest::default()
                .with_topic_names(vec![TopicName(s(name))])
                .with_timeout_ms(self.timeout_ms),
        )?;
        let t = &r.responses[0];
        check(
            t.error_code,
            t.error_message.as_ref(),
            &format!("deleting topic {name}"),
        )
    }

    /// Raises a topic's partition count (Kafka only ever increases it).
    pub fn create_partitions(&mut self, name: &str, total: i32) -> Result<()> {
        let (r, _): (CreatePartitionsResponse, i16) = self.conn.call(
            ApiKey::CreatePartitions,
            2,
            &CreatePartitionsRequest::default()
                .with_topics(vec![CreatePartitionsTopic::default()
                    .with_name(TopicName(s(name)))
                    .with_count(total)])
                .with_timeout_ms(self.timeout_ms),
        )?;
        let t = &r.results[0];
        check(
            t.error_code,
            t.error_message.as_ref(),
            &format!("altering topic {name}"),
        )
    }

    /// A topic's configs as DescribeConfigs reports them: (name, value, source), source being
    /// Kafka's name (DYNAMIC_TOPIC_CONFIG, DEFAULT_CONFIG, ...).
    pub fn describe_topic_configs(
        &mut self,
        topic: &str,
    ) -> Result<Vec<(String, Option<String>, &'static str)>> {
        describe_configs(&mut self.conn, RESOURCE_TOPIC, topic)
    }

    /// IncrementalAlterConfigs on one topic: `set` pairs are SET, `delete` keys are DELETE.
    pub fn alter_topic_configs(
        &mut self,
        topic: &str,
        set: &[(String, String)],
        delete: &[String],
    ) -> Result<()> {
        alter_configs(&mut self.conn, RESOURCE_TOPIC, topic, set, delete)
    }

    /// A broker's configs ("" = the cluster-wide default resource), asked of that broker (the
    /// default of any broker), as Kafka's admin client does.
    pub fn describe_broker_configs_on(
        &mut self,
        broker: &str,
    ) -> Result<Vec<(String, Option<String>, &'static str)>> {
        if broker.is_empty() {
            return describe_configs(&mut self.conn, RESOURCE_BROKER, broker);
        }
        let mut conn = self.broker_conn(broker)?;
        describe_configs(&mut conn, RESOURCE_BROKER, broker)
    }

    /// A connection to broker `broker` (a node id), found in the cluster's metadata.
    fn broker_conn(&mut self, broker: &str) -> Result<Conn> {
        let id: i32 = broker.parse().context("a broker id is a number")?;
        let addr = Cluster::fetch(&mut self.conn, Some(&[]), false)?
            .brokers
            .get(&id)
            .cloned()
            .with_context(|| format!("broker {id} is not in the cluster's metadata"))?;
        Conn::connect(&addr, "weir-admin", Duration::from_secs(30))
    }

    /// Dynamic broker configs of `broker` ("" = the cluster-wide default); a broker's own
    /// resource must be sent to that broker, as Kafka's admin client does.
    pub fn alter_broker_configs(
        &mut self,
        broker: &str,
        set: &[(String, String)],
        delete: &[String],
    ) -> Result<()> {
        if broker.is_empty() {
            return alter_configs(&mut self.conn, RESOURCE_BROKER, broker, set, delete);
        }
        let mut conn = self.broker_conn(broker)?;
        alter_configs(&mut conn, RESOURCE_BROKER, broker, set, delete)
    }

    pub fn describe(&mut self, topics: Option<&[String]>) -> Result<Cluster> {
        Cluster::fetch(&mut self.conn, topics, false)
    }

    /// Topic names, internal topics left out.
    pub fn list_topics(&mut self) -> Result<Vec<String>> {
        let c = self.describe(None)?;
        let mut names: Vec<String> = c
            .topics
            .iter()
            .filter(|(_, t)| !t.internal && t.error == 0)
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn list_groups(&mut self) -> Result<Vec<(String, String)>> {
        let (r, _): (ListGroupsResponse, i16) =
            self.conn
                .call(ApiKey::ListGroups, 4, &ListGroupsRequest::default())?;
        check(r.error_code, None, "listing groups")?;
        let mut g: Vec<(String, String)> = r
            .groups
            .iter()
            .map(|g| (g.group_id.0.to_string(), g.group_state.to_string()))
            .collect();
        g.sort();
        Ok(g)
    }

    pub fn describe_group(&mut self, group: &str) -> Result<GroupDescription> {
        let (r, _): (DescribeGroupsResponse, i16) = self.conn.call(
            ApiKey::DescribeGroups,
            5,
            &DescribeGroupsRequest::default().with_groups(vec![GroupId(s(group))]),
        )?;
        let g = &r.groups[0];
        check(
            g.error_code,
            g.error_message.as_ref(),
            &format!("describing group {group}"),
        )?;
        if g.group_state.as_str() == "Dead" {
            // A KIP-848 consumer-protocol group is described by ConsumerGroupDescribe.
            if let Some(v) = crate::consumer::describe_consumer_group(&mut self.conn, group)? {
                let mut owners = BTreeMap::new();
                for (id, client, host, tps) in &v.members {
                    for tp in tps {
                        owners.insert(tp.clone(), (id.clone(), host.clone(), client.clone()));
                    }
                }
                return Ok(GroupDescription {
                    state: v.state,
                    protocol: v.assignor,
                    members: v
                        .members
                        .into_iter()
                        .map(|(id, client, host, _)| (id, client, host))
                        .collect(),
                    owners,
                });
            }
        }
        let mut owners = BTreeMap::new();
        if g.protocol_type.as_str() == "consumer" {
            for m in &g.members {
                for tp in crate::consumer::decode_assignment(m.member_assignment.clone())
                    .unwrap_or_default()
                {
                    owners.insert(
                        tp,
                        (
                            m.member_id.to_string(),
                            m.client_host.to_string(),
                            m.client_id.to_string(),
                        ),
                    );
                }
            }
        }
        Ok(GroupDescription {
            owners,
            state: g.group_state.to_string(),
            protocol: g.protocol_data.to_string(),
            members: g
                .members
                .iter()
                .map(|m| {
                    (
                        m.member_id.to_string(),
                        m.client_id.to_string(),
                        m.client_host.to_string(),
                    )
                })
                .collect(),
        })
    }

    /// Committed offsets of a group (every partition it committed), with end offsets and lag.
    pub fn group_lag(&mut self, group: &str) -> Result<Vec<PartitionLag>> {
        let (r, _): (OffsetFetchResponse, i16) = self.conn.call(
            ApiKey::OffsetFetch,
            7,
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(s(group)))
                .with_topics(None),
        )?;
        check(
            r.error_code,
            None,
            &format!("fetching offsets of group {group}"),
        )?;
        let mut committed: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for t in &r.topics {
            for p in &t.partitions {
                committed.insert(
                    (t.name.0.to_string(), p.partition_index),
                    p.committed_offset,
                );
            }
        }
        let tps: Vec<TopicPartition> = committed.keys().cloned().collect();
        let ends: BTreeMap<TopicPartition, i64> = if tps.is_empty() {
            BTreeMap::new()
        } else {
            list_offsets(&mut self.conn, &tps, -1)?
                .into_iter()
                .collect()
        };
        Ok(committed
            .into_iter()
            .map(|((t, p), c)| {
                let end = ends.get(&(t.clone(), p)).copied().unwrap_or(-1);
                let committed = (c >= 0).then_some(c);
                PartitionLag {
                    topic: t,
                    partition: p,
                    committed,
                    end,
                    lag: committed.map(|c| (end - c).max(0)),
                    owner: None,
                }
            })
            .collect())
    }

    /// Moves a group's committed offsets (the group must have no active members).
    pub fn reset_offsets(&mut self, group: &str, offsets: &[(TopicPartition, i64)]) -> Result<()> {
        let req = crate::consumer::offset_commit_request(group, -1, "", None, offsets);
        let (r, _): (OffsetCommitResponse, i16) = self.conn.call(ApiKey::OffsetCommit, 8, &req)?;
        for t in &r.topics {
            for p in &t.partitions {
                if p.error_code == 25 {
                    bail!("group {group} has active members: stop its consumers before resetting offsets");
                }
                check(
                    p.error_code,
                    None,
                    &format!("resetting {}-{}", t.name.0.as_str(), p.partition_index),
                )?;
            }
        }
        Ok(())
    }

    /// End (-1) or start (-2) offsets.
    pub fn offsets(
        &mut self,
        tps: &[TopicPartition],
        which: i64,
    ) -> Result<Vec<(TopicPartition, i64)>> {
        list_offsets(&mut self.conn, tps, which)
    }
}
