//! The cluster overview: cluster id, controller, brokers with the API versions they support,
//! and counts of topics and groups.

use std::fmt::Write as _;

use super::html::{esc, flash, layout};
use super::http::Reply;
use super::{kafka, link, Ctx, Fail, Handled};
use crate::client::metadata::Cluster;

pub fn page(ctx: &Ctx) -> Handled {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let cluster = Cluster::fetch(&mut conn, None, false).map_err(Fail::kafka)?;
    let versions = kafka::broker_versions(&cluster);
    let topics = cluster.topics.values().filter(|t| !t.internal).count();
    let partitions: usize = cluster
        .topics
        .values()
        .filter(|t| !t.internal)
        .map(|t| t.leaders.len())
        .sum();
    let offline: usize = cluster
        .topics
        .values()
        .flat_map(|t| t.leaders.iter())
        .filter(|l| **l < 0)
        .count();
    let under_replicated: usize = cluster
        .topics
        .values()
        .flat_map(|t| t.replicas.iter().zip(t.isr.iter()))
        .filter(|(r, i)| i.len() < r.len())
        .count();

    let mut b = String::new();
    let _ = write!(
        b,
        "<dl class=\"facts\"><dt>Cluster id</dt><dd>{}</dd><dt>Controller</dt><dd id=\"controller\">{}</dd>\
         <dt>Brokers</dt><dd>{}</dd><dt>Topics</dt><dd>{}</dd><dt>Partitions</dt><dd>{}</dd>\
         <dt>Offline partitions</dt><dd>{}</dd><dt>Under-replicated partitions</dt><dd>{}</dd></dl>",
        esc(cluster.cluster_id.as_deref().unwrap_or("unknown")),
        if cluster.controller >= 0 {
            cluster.controller.to_string()
        } else {
            "unknown".into()
        },
        cluster.brokers.len(),
        link("/topics", &topics.to_string()),
        partitions,
        offline,
        under_replicated,
    );
    b.push_str(
        "<h2>Brokers</h2><table id=\"brokers\"><thead><tr><th>Id</th><th>Address</th><th>Role</th>\
         <th>Highest API versions</th></tr></thead><tbody>",
    );
    let mut ids: Vec<&i32> = cluster.brokers.keys().collect();
    ids.sort();
    for id in ids {
        let role = if *id == cluster.controller {
            "controller"
        } else {
            ""
        };
        let v = match &versions[id] {
            Ok(vs) => vs
                .iter()
                .map(|(k, v)| format!("{k:?} v{v}"))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("unreachable: {e}"),
        };
        let _ = write!(
            b,
            "<tr><td>{id}</td><td>{}</td><td>{role}</td><td>{}</td></tr>",
            esc(&cluster.brokers[id]),
            esc(&v)
        );
    }
    b.push_str("</tbody></table>");
    if let Some(note) = ctx.metrics.unavailable() {
        b.push_str(&flash("note", &note));
    }
    Ok(Reply::html(
        200,
        layout("Cluster", "Cluster", &ctx.bootstrap, &b),
    ))
}
