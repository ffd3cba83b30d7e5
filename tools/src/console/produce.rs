//! Producing one record from a form: key, value (text or hex), headers, optional partition.

use std::fmt::Write as _;

use bytes::Bytes;

use super::html::{esc, flash, layout};
use super::http::{Params, Reply, REQUEST_BODY_MAX_BYTES};
use super::topics::describe_topic;
use super::{kafka, link, topic_path, Ctx, Fail, Handled, Req};
use crate::producer::{ProducerConfig, RawProducer, RawRecord};

/// Headers one produced record may carry.
pub const PRODUCE_HEADERS_MAX: usize = 64;
/// Longest the produce form waits for the broker's acknowledgement.
pub const PRODUCE_TIMEOUT_MS: u64 = 15_000;

fn render(ctx: &Ctx, topic: &str, partitions: usize, f: &Params, top: &str, status: u16) -> Reply {
    let v = |k: &str| esc(f.raw(k).unwrap_or(""));
    let hex = if f.get("value_hex").is_some() {
        " checked"
    } else {
        ""
    };
    let mut b = String::new();
    b.push_str(top);
    let _ = write!(
        b,
        "<p class=\"actions\">{} · {}</p>\
         <form method=\"post\" action=\"{}\" id=\"produce\" class=\"stacked\">\
         <label>Key <span class=\"hint\">(empty: no key)</span><input name=\"key\" value=\"{}\"></label>\
         <label>Value<textarea name=\"value\" rows=\"8\">{}</textarea></label>\
         <label class=\"check\"><input type=\"checkbox\" name=\"value_hex\" value=\"1\"{hex}> value is hex (binary values)</label>\
         <label>Headers <span class=\"hint\">(one per line: name: value)</span><textarea name=\"headers\" rows=\"3\">{}</textarea></label>\
         <label>Partition <span class=\"hint\">(empty: chosen by the partitioner; 0 to {})</span>\
         <input name=\"partition\" inputmode=\"numeric\" value=\"{}\"></label>\
         <button type=\"submit\">Produce</button></form>\
         <p class=\"hint\">At most {REQUEST_BODY_MAX_BYTES} bytes per form and {PRODUCE_HEADERS_MAX} headers.</p>",
        link(&topic_path(topic, ""), &format!("Back to {topic}")),
        link(&topic_path(topic, "/messages"), "Messages"),
        esc(&topic_path(topic, "/produce")),
        v("key"),
        v("value"),
        v("headers"),
        partitions.saturating_sub(1),
        v("partition"),
    );
    Reply::html(
        status,
        layout(&format!("{topic}: produce"), "Topics", &ctx.bootstrap, &b),
    )
}

/// GET /topics/T/produce (after a produce: `done=1&partition=P&offset=O`).
pub fn form(ctx: &Ctx, req: &Req, topic: &str) -> Handled {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let c = describe_topic(&mut conn, topic)?;
    let n = c.topics[topic].leaders.len();
    let mut top = String::new();
    if req.query.get("done").is_some() {
        let p: Option<i32> = req.query.num("partition", "").ok().flatten();
        let o: Option<i64> = req.query.num("offset", "").ok().flatten();
        if let (Some(p), Some(o)) = (p, o) {
            top = format!(
                "{}<p>{}</p>",
                flash("ok", &format!("Produced to partition {p} at offset {o}.")),
                link(
                    &format!(
                        "{}?partition={p}&from=offset&offset={o}",
                        topic_path(topic, "/messages")
                    ),
                    "Show it"
                )
            );
        }
    }
    Ok(render(ctx, topic, n, &Params::default(), &top, 200))
}

/// `name: value` (or `name=value`) lines.
fn parse_headers(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once(':').or_else(|| line.split_once('=')) else {
            return Err(format!(
                "Header line {}: {line:?} is not \"name: value\"",
                i + 1
            ));
        };
        if k.trim().is_empty() {
            return Err(format!("Header line {}: the name is empty", i + 1));
        }
        out.push((k.trim().to_string(), v.trim_start().as_bytes().to_vec()));
    }
    if out.len() > PRODUCE_HEADERS_MAX {
        return Err(format!(
            "{} headers: at most {PRODUCE_HEADERS_MAX}",
            out.len()
        ));
    }
    Ok(out)
}

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err("Value: hex needs an even number of digits".into());
    }
    digits
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(|| format!("Value: {:?} is not a hex byte", String::from_utf8_lossy(p)))
        })
        .collect()
}

/// POST /topics/T/produce: sends the record and waits for its offset; on refusal the form
/// comes back filled in with the message.
pub fn submit(ctx: &Ctx, req: &Req, topic: &str) -> Handled {
    let mut conn = kafka::connect(&ctx.bootstrap).map_err(Fail::kafka)?;
    let c = describe_topic(&mut conn, topic)?;
    let n = c.topics[topic].leaders.len();
    let f = &req.form;
    let again = |msg: &str| Ok(render(ctx, topic, n, f, &flash("error", msg), 400));
    let partition = match f.num::<i32>("partition", "Partition") {
        Ok(None) => None,
        Ok(Some(p)) if p >= 0 && (p as usize) < n => Some(p),
        Ok(Some(p)) => {
            return again(&format!(
                "Partition {p} does not exist: topic {topic} has partitions 0 to {}",
                n - 1
            ))
        }
        Err(e) => return again(&e.to_string()),
    };
    let headers = match parse_headers(f.raw("headers").unwrap_or("")) {
        Ok(h) => h,
        Err(e) => return again(&e),
    };
    let value_text = f.raw("value").unwrap_or("");
    let value = if f.get("value_hex").is_some() {
        match parse_hex(value_text) {
            Ok(v) => v,
            Err(e) => return again(&e),
        }
    } else {
        // Browsers send newlines in a textarea as CRLF.
        value_text.replace("\r\n", "\n").into_bytes()
    };
    let key = f
        .raw("key")
        .filter(|k| !k.is_empty())
        .map(|k| Bytes::from(k.to_string()));

    let mut cfg = ProducerConfig::new(&ctx.bootstrap);
    let timeout = PRODUCE_TIMEOUT_MS.to_string();
    let set = (|| -> anyhow::Result<()> {
        cfg.set("client.id", kafka::CLIENT_ID)?
            .set("linger.ms", "0")?
            .set("acks", "all")?
            .set("max.block.ms", &timeout)?
            .set("request.timeout.ms", &timeout)?
            .set("delivery.timeout.ms", &timeout)?;
        Ok(())
    })();
    set.map_err(Fail::kafka)?;
    let producer = RawProducer::new(cfg, Vec::new()).map_err(Fail::kafka)?;
    let sent = producer.send(RawRecord {
        topic: topic.to_string(),
        partition,
        key,
        value: Some(Bytes::from(value)),
        headers,
        timestamp: crate::now_ms(),
    });
    let result = match sent {
        Ok(fut) => {
            producer.flush();
            fut.get().map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    producer.close();
    match result {
        Ok(m) => Ok(Reply::redirect(format!(
            "{}?done=1&partition={}&offset={}",
            topic_path(topic, "/produce"),
            m.partition,
            m.offset
        ))),
        Err(e) => again(&format!("Not produced: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_hex() {
        assert_eq!(
            parse_headers("a: 1\n\nb=two\n").unwrap(),
            vec![("a".into(), b"1".to_vec()), ("b".into(), b"two".to_vec())]
        );
        assert!(parse_headers("nonsense").unwrap_err().contains("line 1"));
        assert_eq!(parse_hex("ff 00 0A").unwrap(), vec![0xff, 0, 10]);
        assert!(parse_hex("fff").is_err());
        assert!(parse_hex("zz").is_err());
    }
}
