//! Topics: the list (with record counts, sizes and throughput sparklines), one topic's
//! partitions, creating a topic, adding partitions, deleting (after a confirmation step), and
//! a topic's configs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::json;

use super::html::{bytes, esc, flash, layout};
use super::http::Reply;
use super::{kafka, link, topic_path, Ctx, Fail, Handled, Req};
use crate::admin::Admin;
use crate::client::metadata::Cluster;
use crate::consumer::TopicPartition;

/// Topics listed at most on the topics page.
pub const TOPICS_PAGE_MAX: usize = 1000;
/// Kafka's longest topic name.
pub const TOPIC_NAME_MAX_CHARS: usize = 249;
/// Most partitions the create and add-partitions forms accept.
pub const PARTITIONS_MAX: i32 = 10_000;

/// Why `name` cannot be a topic name (Kafka's rule), if it cannot.
pub fn invalid_topic_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("Topic name is required".into());
    }
    if name == "." || name == ".." {
        return Some(format!("Topic name {name:?} is not allowed"));
    }
    if name.chars().count() > TOPIC_NAME_MAX_CHARS {
        return Some(format!(
            "Topic name is longer than {TOPIC_NAME_MAX_CHARS} characters"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Some(format!(
            "Topic name {name:?} may only contain ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    None
}

/// Metadata of one topic, or a 404 naming it.
pub fn describe_topic(conn: &mut crate::Conn, topic: &str) -> Result<Cluster, Fail> {
    if let Some(why) = invalid_topic_name(topic) {
        return Err(Fail::not_found(format!(
            "Topic {topic:?} does not exist ({why})"
        )));
    }
    let c = Cluster::fetch(conn, Some(&[topic.to_string()]), false).map_err(Fail::kafka)?;
    match c.topics.get(topic) {
        Some(t) if t.error == 0 && !t.leaders.is_empty() => Ok(c),
        Some(t) if t.error != 0 && t.error != 3 => Err(Fail::bad_request(format!(
            "Topic {topic}: {}",
            crate::error_name(t.error)
        ))),
        _ => Err(Fail::not_found(format!("Topic {topic} does not exist"))),
    }
}

/// (start, end) offsets of every partition of `topics`, from the leaders.
fn offset_ranges(
    conn: &mut crate::Conn,
    c: &Cluster,
    topics: &[String],
) -> anyhow::Result<BTreeMap<TopicPartition, (i64, i64)>> {
    let tps: Vec<TopicPartition> = topics
        .iter()
        .flat_map(|t| {
            let n = c.topics.get(t).map_or(0, |i| i.leaders.len()) as i32;
            (0..n).map(move |p| (t.clone(), p))
        })
        .collect();
    if tps.is_empty() {
        return Ok(BTreeMap::new());
    }
    let starts = kafka::offsets(conn, c, &tps, -2)?;
    let ends = kafka::offsets(conn, c, &tps, -1)?;
    Ok(starts
        .into_iter()
        .filter_map(|(tp, s)| ends.get(&tp).map(|e| (tp, (s, *e))))
        .collect())
}

fn create_form(name: &str, partitions: &str, rf: &str) -> String {
    format!(
        "<h2>Create a topic</h2><form method=\"post\" action=\"/topics\" id=\"create-topic\" class=\"inline\">\
         <label>Name <input name=\"name\" required maxlength=\"{TOPIC_NAME_MAX_CHARS}\" value=\"{}\"></label>\
         <label>Partitions <input name=\"partitions\" inputmode=\"numeric\" size=\"5\" value=\"{}\"></label>\
         <label>Replication factor <input name=\"replication_factor\" inputmode=\"numeric\" size=\"5\" \
         placeholder=\"default\" value=\"{}\"></label>\
         <button type=\"submit\">Create topic</button></form>",
        esc(name),
        esc(partitions),
        esc(rf)
    )
}

/// GET /topics
pub fn list(ctx: &Ctx, req: &Req) -> Handled {
    render_list(
        ctx,
        None,
        create_form("", "1", ""),
        200,
        req.query.get("done"),
    )
}

fn render_list(
    ctx: &Ctx,
    message: Option<String>,
    form: String,
    status: u16,
    done: Option<&str>,
) -> Handled {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let c = Cluster::fetch(&mut conn, None, false).map_err(Fail::kafka)?;
    let mut names: Vec<String> = c
        .topics
        .iter()
        .filter(|(_, t)| !t.internal && t.error == 0)
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    let total = names.len();
    names.truncate(TOPICS_PAGE_MAX);
    let ranges = offset_ranges(&mut conn, &c, &names).unwrap_or_default();
    let sizes = kafka::partition_sizes(&c, &names);

    let mut b = String::new();
    if let Some(m) = message {
        b.push_str(&flash("error", &m));
    }
    if done == Some("deleted") {
        b.push_str(&flash("ok", "Topic deleted."));
    }
    if let Some(note) = ctx.metrics.unavailable() {
        b.push_str(&flash("note", &note));
    }
    b.push_str(
        "<table id=\"topics\"><thead><tr><th>Topic</th><th>Partitions</th><th>Replication</th>\
         <th>Under-replicated</th><th>Records</th><th>Size</th><th>Throughput</th><th></th></tr></thead><tbody>",
    );
    for n in &names {
        let t = &c.topics[n];
        let parts = t.leaders.len() as i32;
        let records: i64 = (0..parts)
            .filter_map(|p| ranges.get(&(n.clone(), p)))
            .map(|(s, e)| (e - s).max(0))
            .sum();
        let size = sizes.as_ref().map(|s| {
            (0..parts)
                .filter_map(|p| s.get(&(n.clone(), p)))
                .sum::<i64>()
        });
        let under = t
            .replicas
            .iter()
            .zip(&t.isr)
            .filter(|(r, i)| i.len() < r.len())
            .count();
        let _ = write!(
            b,
            "<tr data-topic=\"{ne}\"><td>{}</td><td>{parts}</td><td>{}</td><td>{under}</td>\
             <td class=\"num records\">{records}</td><td class=\"num\">{}</td>\
             <td class=\"spark-cell\" data-topic=\"{ne}\">{}</td><td>{} · {} · {}</td></tr>",
            link(&topic_path(n, ""), n),
            t.replicas.first().map_or(0, |r| r.len()),
            size.map_or_else(|| "unknown".to_string(), bytes),
            ctx.metrics.sparkline(n).unwrap_or_default(),
            link(&topic_path(n, "/messages"), "messages"),
            link(&topic_path(n, "/produce"), "produce"),
            link(&topic_path(n, "/configs"), "configs"),
            ne = esc(n),
        );
    }
    b.push_str("</tbody></table>");
    if total > names.len() {
        b.push_str(&flash(
            "note",
            &format!("showing the first {TOPICS_PAGE_MAX} of {total} topics"),
        ));
    }
    if names.is_empty() {
        b.push_str("<p class=\"empty\">No topics yet.</p>");
    }
    b.push_str(&form);
    Ok(Reply::html(
        status,
        layout("Topics", "Topics", &ctx.bootstrap, &b),
    ))
}

/// POST /topics: create a topic from the form; on refusal the form comes back filled in.
pub fn create(ctx: &Ctx, req: &Req) -> Handled {
    let name = req.form.get("name").unwrap_or("");
    let parts_text = req.form.get("partitions").unwrap_or("1");
    let rf_text = req.form.get("replication_factor").unwrap_or("");
    let again = |msg: String| {
        render_list(
            ctx,
            Some(msg),
            create_form(name, parts_text, rf_text),
            400,
            None,
        )
    };
    if let Some(why) = invalid_topic_name(name) {
        return again(why);
    }
    let partitions = match parts_text.parse::<i32>() {
        Ok(p) if (1..=PARTITIONS_MAX).contains(&p) => p,
        _ => {
            return again(format!(
                "Partitions: {parts_text:?} is not a number from 1 to {PARTITIONS_MAX}"
            ))
        }
    };
    let rf = if rf_text.is_empty() {
        -1
    } else {
        match rf_text.parse::<i16>() {
            Ok(r) if r >= 1 => r,
            _ => {
                return again(format!(
                    "Replication factor: {rf_text:?} is not a positive number"
                ))
            }
        }
    };
    let mut admin = Admin::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    match admin.create_topic(name, partitions, rf, &[]) {
        Ok(()) => Ok(Reply::redirect(format!(
            "{}?done=created",
            topic_path(name, "")
        ))),
        Err(e) => again(format!("{e:#}")),
    }
}

/// GET /topics/T
pub fn detail(ctx: &Ctx, req: &Req, topic: &str) -> Handled {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let c = describe_topic(&mut conn, topic)?;
    let t = &c.topics[topic];
    let ranges = offset_ranges(&mut conn, &c, &[topic.to_string()]).map_err(Fail::kafka)?;
    let sizes = kafka::partition_sizes(&c, &[topic.to_string()]);
    let list = |v: &Vec<i32>| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut b = String::new();
    match req.query.get("done") {
        Some("created") => b.push_str(&flash("ok", &format!("Created topic {topic}."))),
        Some("partitions") => b.push_str(&flash(
            "ok",
            &format!("Topic {topic} now has {} partitions.", t.leaders.len()),
        )),
        _ => {}
    }
    let _ = write!(
        b,
        "<p class=\"actions\">{} · {} · {} · {}</p>",
        link(&topic_path(topic, "/messages"), "Messages"),
        link(&topic_path(topic, "/produce"), "Produce a record"),
        link(&topic_path(topic, "/configs"), "Configs"),
        link(&topic_path(topic, "/delete"), "Delete topic…"),
    );
    if let Some(s) = ctx.metrics.sparkline(topic) {
        let _ = write!(
            b,
            "<p>Throughput: <span class=\"spark-cell\" data-topic=\"{}\">{s}</span></p>",
            esc(topic)
        );
    }
    b.push_str(
        "<table id=\"partitions\"><thead><tr><th>Partition</th><th>Leader</th><th>Replicas</th>\
         <th>ISR</th><th>Start offset</th><th>End offset</th><th>Records</th><th>Size</th></tr></thead><tbody>",
    );
    let (mut total_records, mut total_size) = (0i64, 0i64);
    for (p, leader) in t.leaders.iter().enumerate() {
        let tp = (topic.to_string(), p as i32);
        let (start, end) = ranges.get(&tp).copied().unwrap_or((-1, -1));
        let records = (end - start).max(0);
        total_records += records;
        let size = sizes.as_ref().and_then(|s| s.get(&tp)).copied();
        total_size += size.unwrap_or(0);
        let off = |o: i64| {
            if o < 0 {
                "unknown".to_string()
            } else {
                o.to_string()
            }
        };
        let _ = write!(
            b,
            "<tr><td>{p}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{records}</td><td class=\"num\">{}</td></tr>",
            if *leader >= 0 {
                leader.to_string()
            } else {
                "none (offline)".into()
            },
            list(&t.replicas[p]),
            list(&t.isr[p]),
            off(start),
            off(end),
            size.map_or_else(|| "unknown".to_string(), bytes),
        );
    }
    let _ = write!(
        b,
        "</tbody><tfoot><tr><td colspan=\"6\">Total</td><td class=\"num\" id=\"total-records\">{total_records}</td>\
         <td class=\"num\">{}</td></tr></tfoot></table>",
        if sizes.is_some() {
            bytes(total_size)
        } else {
            "unknown".into()
        }
    );
    let _ = write!(
        b,
        "<h2>Add partitions</h2><form method=\"post\" action=\"{}\" class=\"inline\">\
         <label>New partition count <input name=\"count\" inputmode=\"numeric\" size=\"5\" \
         value=\"{}\"></label><button type=\"submit\">Add partitions</button></form>",
        esc(&topic_path(topic, "/partitions")),
        t.leaders.len() + 1
    );
    Ok(Reply::html(
        200,
        layout(topic, "Topics", &ctx.bootstrap, &b),
    ))
}

/// POST /topics/T/partitions: raise the partition count.
pub fn add_partitions(ctx: &Ctx, req: &Req, topic: &str) -> Handled {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let c = describe_topic(&mut conn, topic)?;
    let now = c.topics[topic].leaders.len() as i32;
    let count: i32 = req
        .form
        .num("count", "New partition count")
        .map_err(|e| Fail::bad_request(e.to_string()))?
        .ok_or_else(|| Fail::bad_request("New partition count is required"))?;
    if count <= now || count > PARTITIONS_MAX {
        return Err(Fail::bad_request(format!(
            "Topic {topic} has {now} partitions: the new count must be more than {now} and at most {PARTITIONS_MAX} (Kafka never removes partitions)"
        )));
    }
    let mut admin = Admin::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    admin.create_partitions(topic, count).map_err(Fail::kafka)?;
    Ok(Reply::redirect(format!(
        "{}?done=partitions",
        topic_path(topic, "")
    )))
}

/// GET /topics/T/delete: the confirmation step.
pub fn confirm_delete(ctx: &Ctx, topic: &str) -> Handled {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    describe_topic(&mut conn, topic)?;
    let b = format!(
        "{}<form method=\"post\" action=\"{}\" id=\"delete-topic\">\
         <label>Type the topic's name to confirm <input name=\"confirm\" autocomplete=\"off\"></label> \
         <button type=\"submit\" class=\"danger\">Delete topic</button> {}</form>",
        flash(
            "error",
            &format!("Deleting topic {topic} removes all its records. This cannot be undone.")
        ),
        esc(&topic_path(topic, "/delete")),
        link(&topic_path(topic, ""), "Cancel"),
    );
    Ok(Reply::html(
        200,
        layout(&format!("Delete {topic}?"), "Topics", &ctx.bootstrap, &b),
    ))
}

/// POST /topics/T/delete: deletes when the confirmation matches.
pub fn delete(ctx: &Ctx, req: &Req, topic: &str) -> Handled {
    if req.form.get("confirm") != Some(topic) {
        return Err(Fail::bad_request(format!(
            "Not deleted: type the topic's name ({topic}) to confirm"
        )));
    }
    let mut admin = Admin::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    admin.delete_topic(topic).map_err(Fail::kafka)?;
    Ok(Reply::redirect("/topics?done=deleted".into()))
}

/// GET /topics/T/configs
pub fn configs(ctx: &Ctx, topic: &str) -> Handled {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    describe_topic(&mut conn, topic)?;
    let mut admin = Admin::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let mut configs = admin.describe_topic_configs(topic).map_err(Fail::kafka)?;
    configs.sort();
    let mut b = format!(
        "<p class=\"actions\">{}</p><p>Overrides set on this topic are marked.</p>\
         <table id=\"configs\"><thead><tr><th>Name</th><th>Value</th><th>Source</th></tr></thead><tbody>",
        link(&topic_path(topic, ""), &format!("Back to {topic}"))
    );
    for (k, v, source) in &configs {
        let cls = if source.starts_with("DYNAMIC_TOPIC") {
            " class=\"override\""
        } else {
            ""
        };
        let _ = write!(
            b,
            "<tr{cls}><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(k),
            v.as_deref().map_or_else(|| "<i>null</i>".to_string(), esc),
            esc(source)
        );
    }
    b.push_str("</tbody></table>");
    Ok(Reply::html(
        200,
        layout(&format!("{topic}: configs"), "Topics", &ctx.bootstrap, &b),
    ))
}

/// GET /api/sparklines: {"available": bool, "note": text, "topics": {topic: svg}} for the
/// page script to refresh the sparkline cells. The SVG is built from numbers only.
pub fn sparklines(ctx: &Ctx) -> Reply {
    let note = ctx.metrics.unavailable();
    let mut topics = serde_json::Map::new();
    if note.is_none() {
        for t in ctx.metrics.topics() {
            if let Some(s) = ctx.metrics.sparkline(&t) {
                topics.insert(t, s.into());
            }
        }
    }
    Reply::json(
        200,
        &json!({"available": note.is_none(), "note": note, "topics": topics}),
    )
}
