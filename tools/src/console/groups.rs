//! Consumer groups: the list, and one group's state, members, assignments, committed offsets
//! and lag per partition, with an offset reset (earliest, latest, an offset) while it is empty.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::html::{esc, flash, layout};
use super::http::Reply;
use super::topics::describe_topic;
use super::{group_path, kafka, link, topic_path, Ctx, Fail, Handled, Req};
use crate::admin::Admin;
use crate::client::metadata::Cluster;
use crate::consumer::TopicPartition;

/// Groups listed at most.
pub const GROUPS_PAGE_MAX: usize = 1000;
/// Longest group id the console accepts in a path.
pub const GROUP_ID_MAX_CHARS: usize = 1000;

/// GET /groups
pub fn list(ctx: &Ctx) -> Handled {
    let mut admin = Admin::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let groups = admin.list_groups().map_err(Fail::kafka)?;
    let mut b = String::from(
        "<table id=\"groups\"><thead><tr><th>Group</th><th>State</th></tr></thead><tbody>",
    );
    for (g, state) in groups.iter().take(GROUPS_PAGE_MAX) {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td></tr>",
            link(&group_path(g, ""), g),
            esc(if state.is_empty() { "unknown" } else { state })
        );
    }
    b.push_str("</tbody></table>");
    if groups.len() > GROUPS_PAGE_MAX {
        b.push_str(&flash(
            "note",
            &format!(
                "showing the first {GROUPS_PAGE_MAX} of {} groups",
                groups.len()
            ),
        ));
    }
    if groups.is_empty() {
        b.push_str("<p class=\"empty\">No consumer groups.</p>");
    }
    Ok(Reply::html(
        200,
        layout("Consumer groups", "Consumer groups", &ctx.bootstrap, &b),
    ))
}

fn check_group_id(group: &str) -> Result<(), Fail> {
    if group.chars().count() > GROUP_ID_MAX_CHARS {
        return Err(Fail::bad_request(format!(
            "a group id is at most {GROUP_ID_MAX_CHARS} characters"
        )));
    }
    Ok(())
}

/// May Kafka reset this group's offsets from outside it?
fn resettable(state: &str) -> bool {
    matches!(state, "Empty" | "Dead")
}

/// GET /groups/G
pub fn detail(ctx: &Ctx, req: &Req, group: &str) -> Handled {
    check_group_id(group)?;
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let mut coord = kafka::coordinator(&mut conn, group).map_err(Fail::kafka)?;
    let g = kafka::describe_group(&mut coord, group).map_err(Fail::kafka)?;
    let committed = kafka::committed(&mut coord, group).map_err(Fail::kafka)?;
    if g.state == "Dead" && committed.is_empty() {
        return Err(Fail::not_found(format!(
            "Consumer group {group} does not exist"
        )));
    }
    // Rows: every committed partition and every assigned one.
    let mut owner: BTreeMap<TopicPartition, String> = BTreeMap::new();
    for m in &g.members {
        for tp in &m.assignment {
            owner.insert(tp.clone(), format!("{} ({})", m.client_id, m.member_id));
        }
    }
    let tps: BTreeSet<TopicPartition> = committed.keys().chain(owner.keys()).cloned().collect();
    let topics: Vec<String> = tps
        .iter()
        .map(|t| t.0.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let ends = if topics.is_empty() {
        BTreeMap::new()
    } else {
        let c = Cluster::fetch(&mut conn, Some(&topics), false).map_err(Fail::kafka)?;
        let known: Vec<TopicPartition> = tps
            .iter()
            .filter(|(t, p)| {
                c.topics
                    .get(t)
                    .is_some_and(|i| i.error == 0 && (*p as usize) < i.leaders.len())
            })
            .cloned()
            .collect();
        kafka::offsets(&mut conn, &c, &known, -1).map_err(Fail::kafka)?
    };

    let mut b = String::new();
    if req.query.get("done") == Some("reset") {
        b.push_str(&flash("ok", "Offsets reset."));
    }
    let _ = write!(
        b,
        "<dl class=\"facts\"><dt>State</dt><dd id=\"group-state\">{}</dd><dt>Protocol</dt><dd>{}</dd>\
         <dt>Members</dt><dd>{}</dd>",
        esc(&g.state),
        esc(&if g.protocol_type.is_empty() {
            "none".to_string()
        } else {
            format!("{} / {}", g.protocol_type, g.protocol)
        }),
        g.members.len()
    );
    let mut total_lag = 0i64;
    let mut rows = String::new();
    for tp in &tps {
        let c = committed.get(tp).copied();
        let end = ends.get(tp).copied();
        let lag = match (c, end) {
            (Some(c), Some(e)) => Some((e - c).max(0)),
            _ => None,
        };
        total_lag += lag.unwrap_or(0);
        let show = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |x| x.to_string());
        let _ = write!(
            rows,
            "<tr data-tp=\"{}-{}\"><td>{}</td><td class=\"num\">{}</td><td class=\"num committed\">{}</td>\
             <td class=\"num end\">{}</td><td class=\"num lag\">{}</td><td>{}</td></tr>",
            esc(&tp.0),
            tp.1,
            link(&topic_path(&tp.0, ""), &tp.0),
            tp.1,
            show(c),
            show(end),
            show(lag),
            esc(owner.get(tp).map_or("-", |s| s.as_str())),
        );
    }
    let _ = write!(
        b,
        "<dt>Total lag</dt><dd id=\"total-lag\">{total_lag}</dd></dl>\
         <h2>Offsets and lag</h2><table id=\"lag\"><thead><tr><th>Topic</th><th>Partition</th>\
         <th>Committed offset</th><th>End offset</th><th>Lag</th><th>Owner</th></tr></thead><tbody>{rows}</tbody></table>"
    );
    if tps.is_empty() {
        b.push_str("<p class=\"empty\">No committed offsets.</p>");
    }
    b.push_str("<h2>Members</h2><table id=\"members\"><thead><tr><th>Member</th><th>Client</th><th>Host</th><th>Assignment</th></tr></thead><tbody>");
    for m in &g.members {
        let a = m
            .assignment
            .iter()
            .map(|(t, p)| format!("{t}-{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&m.member_id),
            esc(&m.client_id),
            esc(&m.host),
            esc(&a)
        );
    }
    b.push_str("</tbody></table>");
    b.push_str(&reset_form(group, &g.state, &topics));
    Ok(Reply::html(
        200,
        layout(
            &format!("Group {group}"),
            "Consumer groups",
            &ctx.bootstrap,
            &b,
        ),
    ))
}

fn reset_form(group: &str, state: &str, topics: &[String]) -> String {
    let mut b = String::from("<h2>Reset offsets</h2>");
    if !resettable(state) {
        b.push_str(&flash(
            "note",
            &format!(
                "Offsets can be reset only while the group has no members (it is {state}); \
                 Kafka answers NON_EMPTY_GROUP otherwise. Stop its consumers first."
            ),
        ));
    }
    let first = topics.first().map(|s| s.as_str()).unwrap_or("");
    let _ = write!(
        b,
        "<form method=\"post\" action=\"{}\" id=\"reset\" class=\"inline\">\
         <label>Topic <input name=\"topic\" value=\"{}\" required></label>\
         <label>To <select name=\"to\"><option value=\"earliest\">earliest</option>\
         <option value=\"latest\">latest</option><option value=\"offset\">offset</option></select></label>\
         <label>Offset <input name=\"offset\" inputmode=\"numeric\" size=\"8\"></label>\
         <button type=\"submit\">Reset offsets</button></form>",
        esc(&group_path(group, "/reset")),
        esc(first),
    );
    b
}

/// POST /groups/G/reset: commit earliest, latest or a given offset on every partition of a
/// topic, as `kafka-consumer-groups.sh --reset-offsets --execute` does.
pub fn reset(ctx: &Ctx, req: &Req, group: &str) -> Handled {
    check_group_id(group)?;
    let topic = req
        .form
        .get("topic")
        .ok_or_else(|| Fail::bad_request("Topic is required"))?;
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let c = describe_topic(&mut conn, topic)?;
    let n = c.topics[topic].leaders.len() as i32;
    let tps: Vec<TopicPartition> = (0..n).map(|p| (topic.to_string(), p)).collect();
    let targets: Vec<(TopicPartition, i64)> = match req.form.get("to").unwrap_or("") {
        "earliest" => kafka::offsets(&mut conn, &c, &tps, -2)
            .map_err(Fail::kafka)?
            .into_iter()
            .collect(),
        "latest" => kafka::offsets(&mut conn, &c, &tps, -1)
            .map_err(Fail::kafka)?
            .into_iter()
            .collect(),
        "offset" => {
            let o: i64 = req
                .form
                .num("offset", "Offset")
                .map_err(|e| Fail::bad_request(e.to_string()))?
                .filter(|o| *o >= 0)
                .ok_or_else(|| Fail::bad_request("Offset: give a number of 0 or more"))?;
            let starts = kafka::offsets(&mut conn, &c, &tps, -2).map_err(Fail::kafka)?;
            let ends = kafka::offsets(&mut conn, &c, &tps, -1).map_err(Fail::kafka)?;
            for tp in &tps {
                let (Some(s), Some(e)) = (starts.get(tp).copied(), ends.get(tp).copied()) else {
                    return Err(Fail::bad_request(format!(
                        "Partition {} of {topic} has no leader: try again later",
                        tp.1
                    )));
                };
                if o < s || o > e {
                    return Err(Fail::bad_request(format!(
                        "Offset {o} is outside partition {} of {topic} (offsets {s} to {e})",
                        tp.1
                    )));
                }
            }
            tps.iter().map(|tp| (tp.clone(), o)).collect()
        }
        other => {
            return Err(Fail::bad_request(format!(
                "To: {other:?} is not one of earliest, latest, offset"
            )))
        }
    };
    let mut coord = kafka::coordinator(&mut conn, group).map_err(Fail::kafka)?;
    let g = kafka::describe_group(&mut coord, group).map_err(Fail::kafka)?;
    if !resettable(&g.state) {
        return Err(Fail {
            status: 409,
            message: format!(
                "NON_EMPTY_GROUP: group {group} has {} active member(s) (state {}); stop its consumers before resetting offsets",
                g.members.len(),
                g.state
            ),
        });
    }
    kafka::commit(&mut coord, group, &targets).map_err(|e| Fail {
        status: 409,
        message: format!("{e:#}"),
    })?;
    Ok(Reply::redirect(format!(
        "{}?done=reset",
        group_path(group, "")
    )))
}
