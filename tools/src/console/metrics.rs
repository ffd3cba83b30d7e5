//! Per-topic throughput from the broker's Prometheus endpoint: a background thread scrapes
//! `--metrics-url` every SCRAPE_INTERVAL_MS, turns the counter
//! `weir_topic_records_in_total{topic="..."}` into records/s between scrapes, and keeps the
//! last SPARKLINE_POINTS rates per topic for an inline SVG sparkline.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::http::http_get;

/// The counter the broker exports per topic.
pub const RECORDS_IN_METRIC: &str = "weir_topic_records_in_total";
/// Time between scrapes.
pub const SCRAPE_INTERVAL_MS: u64 = 2_000;
/// Rates kept per topic (the sparkline's width in points).
pub const SPARKLINE_POINTS: usize = 60;
/// Topics tracked at most; counters of further topics are ignored.
pub const METRICS_TOPICS_MAX: usize = 10_000;
/// Sparkline size in CSS pixels.
const SPARK_WIDTH_PX: f64 = 120.0;
const SPARK_HEIGHT_PX: f64 = 24.0;

/// What the scraper knows.
#[derive(Default)]
struct State {
    /// None before the first scrape; Some(Err) when the last scrape failed.
    last_scrape: Option<Result<(), String>>,
    at: Option<Instant>,
    counters: HashMap<String, f64>,
    rates: HashMap<String, VecDeque<f64>>,
}

/// The scraper's shared state; `Metrics::disabled()` when no --metrics-url was given.
#[derive(Clone)]
pub struct Metrics {
    url: Option<String>,
    state: Arc<Mutex<State>>,
}

impl Metrics {
    pub fn disabled() -> Metrics {
        Metrics {
            url: None,
            state: Arc::default(),
        }
    }

    /// Starts the scraping thread for `url`.
    pub fn start(url: String) -> Metrics {
        let m = Metrics {
            url: Some(url.clone()),
            state: Arc::default(),
        };
        let state = m.state.clone();
        let _ = std::thread::Builder::new()
            .name("console-metrics".into())
            .spawn(move || loop {
                let got = http_get(&url).map(|body| parse_counters(&body));
                record(&mut state.lock().unwrap(), got, Instant::now());
                std::thread::sleep(Duration::from_millis(SCRAPE_INTERVAL_MS));
            });
        m
    }

    /// Why there is no sparkline (None when there is data to show).
    pub fn unavailable(&self) -> Option<String> {
        let Some(url) = &self.url else {
            return Some("throughput sparklines need --metrics-url".into());
        };
        match &self.state.lock().unwrap().last_scrape {
            None => Some(format!("waiting for the first scrape of {url}")),
            Some(Err(e)) => Some(format!("metrics unavailable from {url}: {e}")),
            Some(Ok(())) => None,
        }
    }

    /// Topics with a counter in the last scrape.
    pub fn topics(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .counters
            .keys()
            .cloned()
            .collect()
    }

    /// The topic's sparkline as inline SVG with its latest rate, or None when no data.
    pub fn sparkline(&self, topic: &str) -> Option<String> {
        let st = self.state.lock().unwrap();
        if !matches!(st.last_scrape, Some(Ok(()))) {
            return None;
        }
        match st.rates.get(topic) {
            Some(r) if !r.is_empty() => Some(svg(r)),
            _ if st.counters.contains_key(topic) => Some(svg(&VecDeque::new())),
            _ => None,
        }
    }
}

/// Folds one scrape into the state: rates from the counter deltas since the previous scrape.
fn record(st: &mut State, got: anyhow::Result<HashMap<String, f64>>, now: Instant) {
    match got {
        Err(e) => {
            st.last_scrape = Some(Err(format!("{e:#}")));
        }
        Ok(counters) => {
            if let Some(prev_at) = st.at {
                let dt = now.duration_since(prev_at).as_secs_f64().max(1e-3);
                for (topic, v) in &counters {
                    let Some(prev) = st.counters.get(topic) else {
                        continue;
                    };
                    // A counter that went down was reset (broker restart): count from zero.
                    let delta = if v >= prev { v - prev } else { *v };
                    let series = st.rates.entry(topic.clone()).or_default();
                    series.push_back(delta / dt);
                    while series.len() > SPARKLINE_POINTS {
                        series.pop_front();
                    }
                }
                st.rates.retain(|t, _| counters.contains_key(t));
            }
            st.counters = counters;
            st.at = Some(now);
            st.last_scrape = Some(Ok(()));
        }
    }
}

/// The per-topic sums of RECORDS_IN_METRIC in a Prometheus text exposition (several series
/// of one topic, e.g. per shard, are added).
pub fn parse_counters(body: &str) -> HashMap<String, f64> {
    let mut out: HashMap<String, f64> = HashMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(RECORDS_IN_METRIC) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((labels, value)) = split_labels(rest) else {
            continue;
        };
        let Some(topic) = label(labels, "topic") else {
            continue;
        };
        let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if out.len() >= METRICS_TOPICS_MAX && !out.contains_key(&topic) {
            continue;
        }
        *out.entry(topic).or_insert(0.0) += v;
    }
    out
}

/// Splits `a="x",b="y"} 12` at the closing brace outside quotes.
fn split_labels(s: &str) -> Option<(&str, &str)> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some((&s[..i], &s[i + 1..])),
            _ => {}
        }
    }
    None
}

/// The unescaped value of label `name` in `a="x",b="y"`.
fn label(labels: &str, name: &str) -> Option<String> {
    let mut rest = labels;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.is_empty() {
            return None;
        }
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        if key.trim() == name {
            return Some(value);
        }
        rest = &after[end + 1..];
    }
}

/// An inline SVG polyline of the rates (scaled to the largest), with the latest rate as text.
fn svg(rates: &VecDeque<f64>) -> String {
    let max = rates.iter().copied().fold(0.0f64, f64::max);
    let n = SPARKLINE_POINTS.max(2) as f64 - 1.0;
    let offset = SPARKLINE_POINTS.saturating_sub(rates.len()) as f64;
    let base = SPARK_HEIGHT_PX - 2.0;
    let mut pts = String::new();
    let mut end = None;
    for (i, r) in rates.iter().enumerate() {
        let x = (offset + i as f64) / n * (SPARK_WIDTH_PX - 3.0) + 1.5;
        let y = if max > 0.0 {
            base - r / max * (SPARK_HEIGHT_PX - 4.0)
        } else {
            base
        };
        let _ = write!(pts, "{x:.1},{y:.1} ");
        end = Some((x, y));
    }
    let dot = end.map_or(String::new(), |(x, y)| {
        format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2\" fill=\"currentColor\"/>")
    });
    let last = rates.back().copied().unwrap_or(0.0);
    format!(
        "<span class=\"spark\"><svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         role=\"img\" aria-label=\"records per second\"><line x1=\"0\" y1=\"{base}\" x2=\"{w}\" \
         y2=\"{base}\" stroke=\"#d0d5db\" stroke-width=\"1\"/><polyline fill=\"none\" \
         stroke=\"currentColor\" stroke-width=\"1.5\" points=\"{pts}\"/>{dot}</svg> \
         <span class=\"rate\">{last:.1} rec/s</span></span>",
        w = SPARK_WIDTH_PX,
        h = SPARK_HEIGHT_PX,
        pts = pts.trim_end(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_with_labels_and_escapes() {
        let body = "# HELP weir_topic_records_in_total Records appended\n\
                    # TYPE weir_topic_records_in_total counter\n\
                    weir_topic_records_in_total{topic=\"a\"} 10\n\
                    weir_topic_records_in_total{shard=\"1\",topic=\"a\"} 5\n\
                    weir_topic_records_in_total{topic=\"q\\\"}x\"} 2 1700000000\n\
                    weir_topic_records_in_total_other{topic=\"a\"} 99\n\
                    weir_topic_bytes_in_total{topic=\"a\"} 99\n";
        let c = parse_counters(body);
        assert_eq!(c.get("a"), Some(&15.0));
        assert_eq!(c.get("q\"}x"), Some(&2.0));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn rates_between_scrapes() {
        let mut st = State::default();
        let t0 = Instant::now();
        record(&mut st, Ok(HashMap::from([("a".to_string(), 100.0)])), t0);
        record(
            &mut st,
            Ok(HashMap::from([("a".to_string(), 300.0)])),
            t0 + Duration::from_secs(2),
        );
        assert_eq!(st.rates["a"], VecDeque::from([100.0]));
        record(&mut st, Err(anyhow::anyhow!("down")), t0);
        assert!(matches!(st.last_scrape, Some(Err(_))));
        assert!(svg(&st.rates["a"]).contains("100.0 rec/s"));
    }
}
