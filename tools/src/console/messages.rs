//! A topic's records: by partition (or all), newest first, or from an offset or a time; and
//! the live tail's JSON endpoint. Records are read with the library's consumer (no group),
//! cut to the display limits as they arrive, and never more than MESSAGES_PAGE_MAX are held.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;

use super::html::{
    self, esc, flash, layout, show, shown_html, Format, Shown, HEADERS_DISPLAY_MAX,
    HEADER_NAME_DISPLAY_MAX_CHARS, HEADER_VALUE_DISPLAY_MAX_BYTES, KEY_DISPLAY_MAX_BYTES,
    VALUE_DISPLAY_MAX_BYTES,
};
use super::http::Reply;
use super::topics::describe_topic;
use super::{kafka, link, topic_path, Ctx, Fail, Handled, Req};
use crate::client::metadata::Cluster;
use crate::consumer::{Consumer, ConsumerConfig, ConsumerRecord, OffsetReset, TopicPartition};

/// Most records one page (or one tail answer) shows and the console holds for it.
pub const MESSAGES_PAGE_MAX: usize = 500;
/// Records a page shows when the form does not say.
pub const MESSAGES_PAGE_DEFAULT: usize = 50;
/// Most records one live-tail poll returns.
pub const TAIL_BATCH_MAX: usize = 100;
/// Longest a page waits for the records it asked for.
pub const READ_TIMEOUT_MS: u64 = 5_000;
/// Longest one live-tail poll waits.
pub const TAIL_TIMEOUT_MS: u64 = 1_500;
/// Fetch sizes of the console's consumer: bound what one poll brings into memory.
const FETCH_MAX_BYTES: i32 = 4 << 20;
const PARTITION_FETCH_MAX_BYTES: i32 = 1 << 20;

/// A record cut to the display limits.
struct Rec {
    partition: i32,
    offset: i64,
    timestamp: i64,
    key: Option<Vec<u8>>,
    key_len: usize,
    value: Option<Vec<u8>>,
    value_len: usize,
    /// (name, value, value length), at most HEADERS_DISPLAY_MAX.
    headers: Vec<(String, Option<Vec<u8>>, usize)>,
    headers_total: usize,
}

fn cut(b: &Option<bytes::Bytes>, max: usize) -> (Option<Vec<u8>>, usize) {
    match b {
        Some(b) => (Some(b[..b.len().min(max)].to_vec()), b.len()),
        None => (None, 0),
    }
}

impl Rec {
    fn from(r: &ConsumerRecord) -> Rec {
        let (key, key_len) = cut(&r.key, KEY_DISPLAY_MAX_BYTES);
        let (value, value_len) = cut(&r.value, VALUE_DISPLAY_MAX_BYTES);
        Rec {
            partition: r.partition,
            offset: r.offset,
            timestamp: r.timestamp,
            key,
            key_len,
            value,
            value_len,
            headers: r
                .headers
                .iter()
                .take(HEADERS_DISPLAY_MAX)
                .map(|(k, v)| {
                    let (v, n) = cut(v, HEADER_VALUE_DISPLAY_MAX_BYTES);
                    (
                        k.chars().take(HEADER_NAME_DISPLAY_MAX_CHARS).collect(),
                        v,
                        n,
                    )
                })
                .collect(),
            headers_total: r.headers.len(),
        }
    }

    /// The key: as hex in hex mode, else as text (keys are rarely JSON).
    fn key(&self, fmt: Format) -> Shown {
        let fmt = if fmt == Format::Hex {
            Format::Hex
        } else {
            Format::Text
        };
        show(
            self.key.as_deref(),
            self.key_len,
            KEY_DISPLAY_MAX_BYTES,
            fmt,
        )
    }

    fn value(&self, fmt: Format) -> Shown {
        show(
            self.value.as_deref(),
            self.value_len,
            VALUE_DISPLAY_MAX_BYTES,
            fmt,
        )
    }

    /// Header lines `name: value` (values as text, hex when not UTF-8) and a note.
    fn headers(&self) -> (Vec<(String, Shown)>, Option<String>) {
        let hs = self
            .headers
            .iter()
            .map(|(k, v, n)| {
                let fmt = Format::Text;
                (
                    k.clone(),
                    show(v.as_deref(), *n, HEADER_VALUE_DISPLAY_MAX_BYTES, fmt),
                )
            })
            .collect();
        let note = (self.headers_total > self.headers.len()).then(|| {
            format!(
                "showing {} of {} headers",
                self.headers.len(),
                self.headers_total
            )
        });
        (hs, note)
    }

    fn json(&self, fmt: Format) -> serde_json::Value {
        let (hs, hnote) = self.headers();
        json!({
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": html::timestamp(self.timestamp),
            "key": self.key(fmt),
            "value": self.value(fmt),
            "headers": hs.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
            "headers_note": hnote,
        })
    }

    fn row(&self, fmt: Format) -> String {
        let (hs, hnote) = self.headers();
        let mut h = String::new();
        for (k, v) in &hs {
            let _ = write!(
                h,
                "<div class=\"header\"><b>{}</b>: {}</div>",
                esc(k),
                shown_html(v)
            );
        }
        if let Some(n) = hnote {
            let _ = write!(h, "<div class=\"note\">{}</div>", esc(&n));
        }
        format!(
            "<tr class=\"record\"><td class=\"num\">{}</td><td class=\"num offset\">{}</td>\
             <td class=\"ts\">{}</td><td class=\"key\">{}</td><td class=\"value\">{}</td><td>{h}</td></tr>",
            self.partition,
            self.offset,
            esc(&html::timestamp(self.timestamp)),
            shown_html(&self.key(fmt)),
            shown_html(&self.value(fmt)),
        )
    }
}

/// Which records, from the form.
enum From {
    Newest,
    Offset(i64),
    Time(i64),
}

/// What `read` got.
struct Got {
    records: Vec<Rec>,
    /// Per partition, the offset after the last record kept or passed over (where a tail
    /// continues).
    next: Offsets,
    /// The timeout passed before every partition was read to its stop offset.
    timed_out: bool,
}

/// Reads records of `starts` partitions from their start offset up to (not including) the
/// `stops` offset, for at most `timeout`. With `newest` the `limit` newest are kept,
/// otherwise the first `limit` read.
fn read(
    bootstrap: &str,
    topic: &str,
    starts: &Offsets,
    stops: &Offsets,
    limit: usize,
    newest: bool,
    timeout: Duration,
) -> anyhow::Result<Got> {
    let mut next: Offsets = starts.clone();
    let pending: Vec<TopicPartition> = starts
        .iter()
        .filter(|(p, s)| stops.get(p).is_some_and(|e| *s < e))
        .map(|(p, _)| (topic.to_string(), *p))
        .collect();
    if pending.is_empty() || limit == 0 {
        return Ok(Got {
            records: Vec::new(),
            next,
            timed_out: false,
        });
    }
    let mut cfg = ConsumerConfig::new(bootstrap);
    cfg.client_id = kafka::CLIENT_ID.into();
    cfg.auto_offset_reset = OffsetReset::Earliest;
    cfg.enable_auto_commit = false;
    cfg.fetch_max_wait_ms = 200;
    cfg.fetch_max_bytes = FETCH_MAX_BYTES;
    cfg.max_partition_fetch_bytes = PARTITION_FETCH_MAX_BYTES;
    cfg.request_timeout = Duration::from_millis(kafka::KAFKA_TIMEOUT_MS);
    let mut c = Consumer::new(cfg)?;
    c.assign(pending.clone())?;
    for tp in &pending {
        c.seek(tp.clone(), starts[&tp.1]);
    }
    let deadline = Instant::now() + timeout;
    // Newest: by offset within one partition; across partitions by timestamp.
    let one = pending.len() == 1;
    let newest_first = |r: &Rec| std::cmp::Reverse((if one { 0 } else { r.timestamp }, r.offset));
    let mut out: Vec<Rec> = Vec::new();
    // Partitions whose records past the limit were dropped (ascending mode): their position
    // is the last record kept, not the consumer's.
    let mut cut_short: BTreeSet<i32> = BTreeSet::new();
    let timed_out = loop {
        let done = pending
            .iter()
            .all(|tp| cut_short.contains(&tp.1) || c.position(tp).unwrap_or(0) >= stops[&tp.1]);
        if done {
            break false;
        }
        if Instant::now() >= deadline {
            break true;
        }
        for r in c.poll(Duration::from_millis(200))? {
            let stop = stops.get(&r.partition).copied().unwrap_or(0);
            if r.offset >= stop || cut_short.contains(&r.partition) {
                continue;
            }
            if !newest && out.len() >= limit {
                cut_short.insert(r.partition);
                continue;
            }
            next.insert(r.partition, r.offset + 1);
            out.push(Rec::from(&r));
        }
        if newest && out.len() > limit {
            out.sort_by_key(newest_first);
            out.truncate(limit);
        }
    };
    for tp in &pending {
        if !cut_short.contains(&tp.1) {
            if let Some(pos) = c.position(tp) {
                next.insert(tp.1, pos.min(stops[&tp.1]).max(next[&tp.1]));
            }
        }
    }
    if newest {
        out.sort_by_key(newest_first);
    } else {
        out.sort_by_key(|r| (r.timestamp, r.partition, r.offset));
    }
    out.truncate(limit);
    Ok(Got {
        records: out,
        next,
        timed_out,
    })
}

/// The partitions the form selects: "all" (or absent) or one number in range.
fn partitions(req: &Req, count: usize) -> Result<Vec<i32>, Fail> {
    match req.query.get("partition") {
        None | Some("all") => Ok((0..count as i32).collect()),
        Some(p) => match p.parse::<i32>() {
            Ok(n) if n >= 0 && (n as usize) < count => Ok(vec![n]),
            Ok(n) => Err(Fail::bad_request(format!(
                "Partition {n} does not exist: the topic has partitions 0 to {}",
                count - 1
            ))),
            Err(_) => Err(Fail::bad_request(format!(
                "Partition: {p:?} is not a number (or \"all\")"
            ))),
        },
    }
}

/// Offsets by partition.
type Offsets = BTreeMap<i32, i64>;

/// Start and end offsets of `parts`, from their leaders.
fn ranges(
    conn: &mut crate::Conn,
    c: &Cluster,
    topic: &str,
    parts: &[i32],
) -> Result<(Offsets, Offsets), Fail> {
    let tps: Vec<TopicPartition> = parts.iter().map(|p| (topic.to_string(), *p)).collect();
    let get = |conn: &mut crate::Conn, w| -> Result<Offsets, Fail> {
        Ok(kafka::offsets(conn, c, &tps, w)
            .map_err(Fail::kafka)?
            .into_iter()
            .map(|((_, p), o)| (p, o))
            .collect())
    };
    Ok((get(conn, -2)?, get(conn, -1)?))
}

/// GET /topics/T/messages
pub fn page(ctx: &Ctx, req: &Req, topic: &str) -> Handled {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let c = describe_topic(&mut conn, topic)?;
    let count = c.topics[topic].leaders.len();
    let fmt = Format::parse(req.query.get("format")).map_err(Fail::bad_request)?;
    let limit: usize = req
        .query
        .num("limit", "Records")
        .map_err(|e| Fail::bad_request(e.to_string()))?
        .unwrap_or(MESSAGES_PAGE_DEFAULT);
    if limit == 0 || limit > MESSAGES_PAGE_MAX {
        return Err(Fail::bad_request(format!(
            "Records: {limit} is not from 1 to {MESSAGES_PAGE_MAX}"
        )));
    }
    let from = match req.query.get("from").unwrap_or("newest") {
        "newest" => From::Newest,
        "offset" => From::Offset(
            req.query
                .num("offset", "Offset")
                .map_err(|e| Fail::bad_request(e.to_string()))?
                .filter(|o: &i64| *o >= 0)
                .ok_or_else(|| Fail::bad_request("Offset: give a number of 0 or more"))?,
        ),
        "timestamp" => {
            let text = req.query.get("timestamp").unwrap_or("");
            From::Time(html::parse_timestamp(text).ok_or_else(|| {
                Fail::bad_request(format!(
                    "Time: {text:?} is not YYYY-MM-DDTHH:MM[:SS] (UTC) or milliseconds since the epoch"
                ))
            })?)
        }
        other => {
            return Err(Fail::bad_request(format!(
                "From: {other:?} is not one of newest, offset, timestamp"
            )))
        }
    };
    let parts = partitions(req, count)?;
    let (first, ends) = ranges(&mut conn, &c, topic, &parts)?;
    let mut notes: Vec<String> = Vec::new();
    let mut starts: Offsets = BTreeMap::new();
    match from {
        From::Newest => {
            for p in &parts {
                let (s, e) = (
                    first.get(p).copied().unwrap_or(0),
                    ends.get(p).copied().unwrap_or(0),
                );
                starts.insert(*p, s.max(e - limit as i64));
            }
        }
        From::Offset(o) => {
            for p in &parts {
                let (s, e) = (
                    first.get(p).copied().unwrap_or(0),
                    ends.get(p).copied().unwrap_or(0),
                );
                if o >= e {
                    notes.push(format!(
                        "Offset {o} is past the end of partition {p} (its next offset is {e})"
                    ));
                } else if o < s {
                    notes.push(format!(
                        "Partition {p} starts at offset {s} (earlier records were deleted): reading from {s}"
                    ));
                    starts.insert(*p, s);
                } else {
                    starts.insert(*p, o);
                }
            }
        }
        From::Time(t) => {
            let tps: Vec<TopicPartition> = parts.iter().map(|p| (topic.to_string(), *p)).collect();
            let at = kafka::offsets(&mut conn, &c, &tps, t).map_err(Fail::kafka)?;
            for p in &parts {
                match at.get(&(topic.to_string(), *p)) {
                    Some(o) if *o >= 0 => {
                        starts.insert(*p, *o);
                    }
                    _ => notes.push(format!(
                        "Partition {p} has no record at or after {}",
                        html::timestamp(t)
                    )),
                }
            }
        }
    }
    let got = read(
        &ctx.bootstrap,
        topic,
        &starts,
        &ends,
        limit,
        matches!(from, From::Newest),
        Duration::from_millis(READ_TIMEOUT_MS),
    )
    .map_err(Fail::kafka)?;
    let records = got.records;
    if got.timed_out {
        notes.push(format!(
            "Reading stopped after {} s: showing the records that arrived by then",
            READ_TIMEOUT_MS / 1000
        ));
    }

    let q = |k: &str| req.query.get(k).unwrap_or("").to_string();
    let mut b = String::new();
    let _ = write!(
        b,
        "<p class=\"actions\">{} · {}</p>",
        link(&topic_path(topic, ""), &format!("Back to {topic}")),
        link(&topic_path(topic, "/produce"), "Produce a record"),
    );
    b.push_str(&form(topic, count, req, fmt, limit));
    for n in &notes {
        b.push_str(&flash("note", n));
    }
    let n = records.len();
    let noun = if n == 1 { "record" } else { "records" };
    let what = match from {
        From::Newest => format!("The {n} newest {noun}, newest first"),
        From::Offset(o) => format!("{n} {noun} from offset {o}"),
        From::Time(t) => format!("{n} {noun} from {}", html::timestamp(t)),
    };
    let _ = write!(b, "<p id=\"summary\">{}</p>", esc(&what));
    let tail_url = format!(
        "/api/topics/{}/tail?partition={}&format={}",
        super::http::encode_component(topic),
        super::http::encode_component(&q("partition")),
        fmt.name()
    );
    let _ = write!(
        b,
        "<p><button type=\"button\" id=\"tail-toggle\" data-url=\"{}\" data-max=\"{MESSAGES_PAGE_MAX}\">Start live tail</button> \
         <span id=\"tail-status\"></span></p>",
        esc(&tail_url)
    );
    b.push_str(
        "<table id=\"records\"><thead><tr><th>Partition</th><th>Offset</th><th>Timestamp</th>\
         <th>Key</th><th>Value</th><th>Headers</th></tr></thead><tbody>",
    );
    for r in &records {
        b.push_str(&r.row(fmt));
    }
    b.push_str("</tbody></table>");
    if records.is_empty() {
        b.push_str("<p class=\"empty\" id=\"no-records\">No records.</p>");
    }
    Ok(Reply::html(
        200,
        layout(&format!("{topic}: messages"), "Topics", &ctx.bootstrap, &b),
    ))
}

/// The filter form of the messages page, filled in from the request.
fn form(topic: &str, count: usize, req: &Req, fmt: Format, limit: usize) -> String {
    let q = |k: &str| req.query.get(k).unwrap_or("").to_string();
    let sel = |a: &str, b: &str| if a == b { " selected" } else { "" };
    let partition = q("partition");
    let all = if partition.is_empty() || partition == "all" {
        " selected"
    } else {
        ""
    };
    let mut opts = format!("<option value=\"all\"{all}>all</option>");
    for p in 0..count {
        let _ = write!(
            opts,
            "<option value=\"{p}\"{}>{p}</option>",
            sel(&partition, &p.to_string())
        );
    }
    let from = q("from");
    let from = if from.is_empty() {
        "newest".to_string()
    } else {
        from
    };
    format!(
        "<form method=\"get\" action=\"{}\" id=\"messages-form\" class=\"inline\">\
         <label>Partition <select name=\"partition\">{opts}</select></label>\
         <label>From <select name=\"from\"><option value=\"newest\"{}>newest first</option>\
         <option value=\"offset\"{}>offset</option><option value=\"timestamp\"{}>time</option></select></label>\
         <label>Offset <input name=\"offset\" inputmode=\"numeric\" size=\"8\" value=\"{}\"></label>\
         <label>Time (UTC) <input name=\"timestamp\" size=\"20\" placeholder=\"2024-01-31T12:00:00 or epoch ms\" value=\"{}\"></label>\
         <label>Records <input name=\"limit\" inputmode=\"numeric\" size=\"4\" value=\"{limit}\"></label>\
         <label>Show as <select name=\"format\"><option value=\"text\"{}>text</option>\
         <option value=\"json\"{}>pretty JSON</option><option value=\"hex\"{}>hex</option></select></label>\
         <button type=\"submit\">Show</button></form>\
         <p class=\"hint\">Values longer than {VALUE_DISPLAY_MAX_BYTES} bytes are cut; at most {MESSAGES_PAGE_MAX} records per page.</p>",
        esc(&topic_path(topic, "/messages")),
        sel(&from, "newest"),
        sel(&from, "offset"),
        sel(&from, "timestamp"),
        esc(&q("offset")),
        esc(&q("timestamp")),
        sel(fmt.name(), "text"),
        sel(fmt.name(), "json"),
        sel(fmt.name(), "hex"),
    )
}

/// GET /api/topics/T/tail?partition=P&format=F[&pos=p:o,p:o]: without `pos`, the current end
/// offsets (the tail starts there); with it, up to TAIL_BATCH_MAX records from there and the
/// positions to ask from next. Errors are JSON too: {"error": message}.
pub fn tail(ctx: &Ctx, req: &Req, topic: &str) -> Reply {
    match tail_inner(ctx, req, topic) {
        Ok(v) => Reply::json(200, &v),
        Err(f) => Reply::json(f.status, &json!({"error": f.message})),
    }
}

fn tail_inner(ctx: &Ctx, req: &Req, topic: &str) -> Result<serde_json::Value, Fail> {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let c = describe_topic(&mut conn, topic)?;
    let count = c.topics[topic].leaders.len();
    let fmt = Format::parse(req.query.get("format")).map_err(Fail::bad_request)?;
    let parts = partitions(req, count)?;
    let (_, ends) = ranges(&mut conn, &c, topic, &parts)?;
    let starts: Offsets = match req.query.get("pos") {
        None => ends.clone(),
        Some(text) => {
            let mut m = ends.clone();
            for item in text.split(',').filter(|s| !s.is_empty()) {
                let parsed = item
                    .split_once(':')
                    .and_then(|(p, o)| Some((p.parse::<i32>().ok()?, o.parse::<i64>().ok()?)));
                match parsed {
                    Some((p, o)) if m.contains_key(&p) && o >= 0 => {
                        m.insert(p, o);
                    }
                    _ => return Err(Fail::bad_request(format!("pos: bad item {item:?}"))),
                }
            }
            m
        }
    };
    let (records, next) = if req.query.get("pos").is_none() {
        (Vec::new(), ends)
    } else {
        let got = read(
            &ctx.bootstrap,
            topic,
            &starts,
            &ends,
            TAIL_BATCH_MAX,
            false,
            Duration::from_millis(TAIL_TIMEOUT_MS),
        )
        .map_err(Fail::kafka)?;
        (got.records, got.next)
    };
    let pos = next
        .iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok(json!({
        "pos": pos,
        "records": records.iter().map(|r| r.json(fmt)).collect::<Vec<_>>(),
    }))
}
