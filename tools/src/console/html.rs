//! HTML building blocks: escaping (every piece of broker or user data goes through `esc`), the
//! page layout with its inline stylesheet and script, and the formatting of record fields.

use std::fmt::Write as _;

/// The stylesheet and script every page inlines (committed assets, no build step, no CDN).
const STYLE: &str = include_str!("../../console-assets/console.css");
const SCRIPT: &str = include_str!("../../console-assets/console.js");

/// Longest key shown; longer keys are cut with a note.
pub const KEY_DISPLAY_MAX_BYTES: usize = 1024;
/// Longest value shown; a 1 MB record is cut to this with a note, so it cannot hang the page.
pub const VALUE_DISPLAY_MAX_BYTES: usize = 4096;
/// Headers shown per record; the rest are counted in a note.
pub const HEADERS_DISPLAY_MAX: usize = 32;
/// Longest header value shown.
pub const HEADER_VALUE_DISPLAY_MAX_BYTES: usize = 256;
/// Longest header name shown.
pub const HEADER_NAME_DISPLAY_MAX_CHARS: usize = 256;

/// Escapes text for HTML element content and double-quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A message box on a page: `ok` (green), `error` (red) or `note` (grey).
pub fn flash(kind: &str, text: &str) -> String {
    format!(
        "<div class=\"flash {kind}\" role=\"status\">{}</div>",
        esc(text)
    )
}

/// A whole page: title, navigation (the section `active` highlighted), then `body`.
pub fn layout(title: &str, active: &str, bootstrap: &str, body: &str) -> String {
    let mut nav = String::new();
    for (href, label) in [
        ("/", "Cluster"),
        ("/topics", "Topics"),
        ("/groups", "Consumer groups"),
    ] {
        let cls = if label == active {
            " class=\"active\""
        } else {
            ""
        };
        let _ = write!(nav, "<a href=\"{href}\"{cls}>{label}</a>");
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · Weir console</title><style>{STYLE}</style></head>\
         <body><header><span class=\"brand\">Weir console</span><nav>{nav}</nav>\
         <span class=\"bootstrap\">{bs}</span></header><main>\
         <h1>{t}</h1>{body}</main><script>{SCRIPT}</script></body></html>\n",
        t = esc(title),
        bs = esc(bootstrap),
    )
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC` (negative: "none").
pub fn timestamp(ms: i64) -> String {
    if ms < 0 {
        return "none".into();
    }
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A time typed in a form: milliseconds since the epoch, or `YYYY-MM-DD[THH:MM[:SS]][Z]`
/// (read as UTC; what a `datetime-local` input sends).
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) {
        return t.parse().ok();
    }
    let t = t.trim_end_matches('Z').replace(' ', "T");
    let (date, time) = t.split_once('T').unwrap_or((&t, "00:00:00"));
    let mut dp = date.split('-');
    let y: i64 = dp.next()?.parse().ok()?;
    let m: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    if dp.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut tp = time.split(':');
    let h: i64 = tp.next()?.parse().ok()?;
    let mi: i64 = tp.next().unwrap_or("0").parse().ok()?;
    let sec: f64 = tp.next().unwrap_or("0").parse().ok()?;
    if tp.next().is_some() || h > 23 || mi > 59 || !(0.0..61.0).contains(&sec) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    Some(days * 86_400_000 + h * 3_600_000 + mi * 60_000 + (sec * 1000.0) as i64)
}

/// Bytes as B, KiB, MiB, GiB.
pub fn bytes(n: i64) -> String {
    if n < 0 {
        return "unknown".into();
    }
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// How a record's value (or key) is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Hex,
}

impl Format {
    pub fn parse(s: Option<&str>) -> Result<Format, String> {
        match s.unwrap_or("text") {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            "hex" => Ok(Format::Hex),
            other => Err(format!("Format {other:?} is not one of text, json, hex")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
            Format::Hex => "hex",
        }
    }
}

/// A field prepared for display: the text (not yet escaped) and a note about how it was
/// shown (truncated, not UTF-8, not JSON), if any.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Shown {
    pub text: String,
    pub note: Option<String>,
    pub null: bool,
}

/// Renders `data` (the first `max` bytes of a field of `full_len` bytes; the caller keeps no
/// more) as text, pretty JSON or hex. Text that is not UTF-8 falls back to hex, JSON that
/// does not parse (or was truncated) falls back to text.
pub fn show(data: Option<&[u8]>, full_len: usize, max: usize, fmt: Format) -> Shown {
    let Some(data) = data else {
        return Shown {
            text: "null".into(),
            note: None,
            null: true,
        };
    };
    let data = &data[..data.len().min(max)];
    let truncated = full_len > data.len();
    let mut notes = Vec::new();
    if truncated {
        notes.push(format!(
            "showing the first {} of {full_len} bytes",
            data.len()
        ));
    }
    let as_hex = |d: &[u8]| {
        let mut s = String::with_capacity(d.len() * 3);
        for (i, b) in d.iter().enumerate() {
            if i > 0 {
                s.push(if i % 16 == 0 { '\n' } else { ' ' });
            }
            let _ = write!(s, "{b:02x}");
        }
        s
    };
    // A cut can split a UTF-8 sequence: accept an incomplete tail when truncated.
    let utf8 = match std::str::from_utf8(data) {
        Ok(s) => Some(s.to_string()),
        Err(e) if truncated && e.error_len().is_none() => {
            Some(String::from_utf8_lossy(&data[..e.valid_up_to()]).into_owned())
        }
        Err(_) => None,
    };
    let text = match (fmt, utf8) {
        (Format::Hex, _) => as_hex(data),
        (Format::Json, Some(s)) if !truncated => {
            match serde_json::from_str::<serde_json::Value>(&s) {
                Ok(v) => serde_json::to_string_pretty(&v).unwrap_or(s),
                Err(_) => {
                    notes.push("not JSON: shown as text".into());
                    s
                }
            }
        }
        (Format::Json, Some(s)) => {
            notes.push("truncated: not pretty-printed".into());
            s
        }
        (_, Some(s)) => s,
        (_, None) => {
            notes.push("not UTF-8: shown as hex".into());
            as_hex(data)
        }
    };
    Shown {
        text,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
        null: false,
    }
}

/// A shown field as HTML: `<pre>` with the text, and the note below it.
pub fn shown_html(s: &Shown) -> String {
    let cls = if s.null { " class=\"null\"" } else { "" };
    let mut out = format!("<pre{cls}>{}</pre>", esc(&s.text));
    if let Some(n) = &s.note {
        let _ = write!(out, "<div class=\"note\">{}</div>", esc(n));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }

    #[test]
    fn timestamps_round_trip() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14 22:13:20.123 UTC");
        assert_eq!(
            parse_timestamp("2023-11-14T22:13:20"),
            Some(1_700_000_000_000)
        );
        assert_eq!(parse_timestamp("2023-11-14T22:13"), Some(1_699_999_980_000));
        assert_eq!(parse_timestamp("1700000000123"), Some(1_700_000_000_123));
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp("2023-13-01"), None);
    }

    #[test]
    fn shows_values() {
        let j = show(Some(br#"{"a":1}"#), 7, 4096, Format::Json);
        assert_eq!(j.text, "{\n  \"a\": 1\n}");
        assert_eq!(j.note, None);
        let bin = show(Some(&[0xff, 0x00]), 2, 4096, Format::Text);
        assert_eq!(bin.text, "ff 00");
        assert!(bin.note.unwrap().contains("not UTF-8"));
        let big = vec![b'x'; 10_000];
        let t = show(Some(&big[..4096]), 10_000, 4096, Format::Text);
        assert_eq!(t.text.len(), 4096);
        assert!(t.note.unwrap().contains("first 4096 of 10000 bytes"));
        // A cut inside a multi-byte character is still text.
        let euro = "€€".as_bytes();
        assert_eq!(show(Some(&euro[..4]), 6, 4, Format::Text).text, "€");
        assert!(show(None, 0, 10, Format::Text).null);
    }
}
