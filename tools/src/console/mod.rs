//! `weir console`: a web console for any Kafka-compatible cluster, served from this process
//! over HTTP (tiny_http, blocking, a few worker threads) and talking to the cluster with this
//! crate's client library. Pages are rendered on the server; a small inline script adds the
//! live tail and refreshes sparklines. Nothing is cached: each request asks the cluster.
//!
//! Pages (module per page):
//!   /                               cluster overview (`overview`)
//!   /topics, /topics/T              topics, one topic; create, add partitions, delete (`topics`)
//!   /topics/T/messages              a topic's records, newest first or from an offset/time,
//!                                   and /api/topics/T/tail for the live tail (`messages`)
//!   /topics/T/produce               produce one record (`produce`)
//!   /topics/T/configs               a topic's configs (`topics`)
//!   /groups, /groups/G              consumer groups, lag, offset reset (`groups`)
//!   /api/sparklines                 the topics' throughput sparklines as JSON (`metrics`)

mod groups;
pub mod html;
pub mod http;
mod kafka;
mod messages;
pub mod metrics;
mod overview;
mod produce;
mod topics;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, Result};

use self::html::{esc, flash, layout};
use self::http::{Params, Reply};

/// Threads answering requests (a slow cluster call holds one).
pub const WORKER_THREADS: usize = 8;

/// What `weir console` was started with.
#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    pub bootstrap: String,
    pub listen: String,
    pub metrics_url: Option<String>,
}

/// What every handler sees.
pub struct Ctx {
    pub bootstrap: String,
    pub metrics: metrics::Metrics,
}

/// One request, decoded: method, path segments (percent-decoded), query and form fields.
pub struct Req {
    pub method: String,
    pub segments: Vec<String>,
    pub query: Params,
    pub form: Params,
}

/// A page that could not be served: the status and a message for the user.
#[derive(Debug)]
pub struct Fail {
    pub status: u16,
    pub message: String,
}

impl Fail {
    pub fn bad_request(message: impl Into<String>) -> Fail {
        Fail {
            status: 400,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Fail {
        Fail {
            status: 404,
            message: message.into(),
        }
    }

    /// A failed cluster call: 502 when the cluster could not be reached, 404 for a topic or
    /// group that does not exist, 400 for any other refusal (the broker's error name is in the
    /// message).
    pub fn kafka(e: anyhow::Error) -> Fail {
        let message = format!("{e:#}");
        let unreachable = ["cannot connect", "reading from", "writing to", "resolving"]
            .iter()
            .any(|p| message.contains(p));
        let missing = message.contains("UNKNOWN_TOPIC_OR_PARTITION")
            || message.contains("does not exist")
            || message.contains("GROUP_ID_NOT_FOUND");
        Fail {
            status: if unreachable {
                502
            } else if missing {
                404
            } else {
                400
            },
            message,
        }
    }
}

pub type Handled = std::result::Result<Reply, Fail>;

/// A running console: its address (useful with `--listen 127.0.0.1:0`).
pub struct Console {
    pub addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    ctx: Arc<Ctx>,
}

impl Console {
    /// Binds the listener and starts the metrics scraper.
    pub fn bind(cfg: &ConsoleConfig) -> Result<Console> {
        let server = tiny_http::Server::http(&cfg.listen)
            .map_err(|e| anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow!("{} is not an IP address", cfg.listen))?;
        let metrics = match &cfg.metrics_url {
            Some(u) => metrics::Metrics::start(u.clone()),
            None => metrics::Metrics::disabled(),
        };
        Ok(Console {
            addr,
            server: Arc::new(server),
            ctx: Arc::new(Ctx {
                bootstrap: cfg.bootstrap.clone(),
                metrics,
            }),
        })
    }

    /// Answers requests on WORKER_THREADS threads until the process ends.
    pub fn run(self) -> Result<()> {
        let mut workers = Vec::new();
        for i in 0..WORKER_THREADS {
            let server = self.server.clone();
            let ctx = self.ctx.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("console-http-{i}"))
                    .spawn(move || {
                        while let Ok(rq) = server.recv() {
                            serve_one(&ctx, rq);
                        }
                    })?,
            );
        }
        for w in workers {
            let _ = w.join();
        }
        Ok(())
    }
}

/// `weir console`: bind, print the address, serve.
pub fn serve(cfg: ConsoleConfig) -> Result<()> {
    let c = Console::bind(&cfg)?;
    println!("Weir console on http://{} for {}", c.addr, cfg.bootstrap);
    c.run()
}

fn serve_one(ctx: &Ctx, mut rq: tiny_http::Request) {
    let method = rq.method().as_str().to_ascii_uppercase();
    let url = rq.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| http::decode_component(s, false))
        .collect();
    let form = if method == "POST" && cross_site(&rq) {
        Err(Fail {
            status: 403,
            message: "a form posted from another site is refused".into(),
        })
    } else if method == "POST" {
        let declared = rq.body_length();
        match http::read_body(rq.as_reader(), declared) {
            Ok(b) => Ok(Params::parse(&b)),
            Err(e) => Err(Fail {
                status: 413,
                message: format!("{e:#}"),
            }),
        }
    } else {
        Ok(Params::default())
    };
    let req_query = Params::parse(query);
    let reply = match form {
        Err(f) => fail_page(ctx, &f),
        Ok(form) => {
            let req = Req {
                method,
                segments,
                query: req_query,
                form,
            };
            // A bug in a handler becomes a message, never a dropped connection.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| route(ctx, &req))) {
                Ok(Ok(r)) => r,
                Ok(Err(f)) => fail_page(ctx, &f),
                Err(_) => fail_page(
                    ctx,
                    &Fail {
                        status: 500,
                        message: "the console hit an internal error on this page".into(),
                    },
                ),
            }
        }
    };
    let mut resp =
        tiny_http::Response::from_data(reply.body.into_bytes()).with_status_code(reply.status);
    resp.add_header(header("Content-Type", reply.content_type));
    resp.add_header(header("Cache-Control", "no-store"));
    resp.add_header(header("X-Content-Type-Options", "nosniff"));
    resp.add_header(header(
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
         connect-src 'self'; img-src 'self' data:; form-action 'self'",
    ));
    if let Some(loc) = reply.location {
        resp.add_header(header("Location", &loc));
    }
    let _ = rq.respond(resp);
}

/// A POST whose Origin is not this server (a page elsewhere submitting a form here: cross-site
/// request forgery). Requests without an Origin (curl, scripts) are not browsers' cross-site
/// posts and pass.
fn cross_site(rq: &tiny_http::Request) -> bool {
    let get = |name: &'static str| {
        rq.headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().to_string())
    };
    match (get("Origin"), get("Host")) {
        (None, _) => false,
        (Some(origin), Some(host)) => origin.split_once("://").map(|(_, a)| a) != Some(&host),
        (Some(_), None) => true,
    }
}

fn header(k: &str, v: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("ASCII header")
}

/// An error page: the message in a red box, and links back.
fn fail_page(ctx: &Ctx, f: &Fail) -> Reply {
    let title = match f.status {
        404 => "Not found",
        413 => "Request too large",
        403 => "Forbidden",
        502 => "Cluster unreachable",
        500 => "Internal error",
        _ => "Request refused",
    };
    let body = format!(
        "{}<p><a href=\"/\">Cluster overview</a> · <a href=\"/topics\">Topics</a> · \
         <a href=\"/groups\">Consumer groups</a></p>",
        flash("error", &f.message)
    );
    Reply::html(f.status, layout(title, "", &ctx.bootstrap, &body))
}

fn route(ctx: &Ctx, req: &Req) -> Handled {
    let seg: Vec<&str> = req.segments.iter().map(|s| s.as_str()).collect();
    let get = req.method == "GET" || req.method == "HEAD";
    let post = req.method == "POST";
    match (seg.as_slice(), get, post) {
        ([], true, _) => overview::page(ctx),
        (["topics"], true, _) => topics::list(ctx, req),
        (["topics"], _, true) => topics::create(ctx, req),
        (["topics", t], true, _) => topics::detail(ctx, req, t),
        (["topics", t, "partitions"], _, true) => topics::add_partitions(ctx, req, t),
        (["topics", t, "delete"], true, _) => topics::confirm_delete(ctx, t),
        (["topics", t, "delete"], _, true) => topics::delete(ctx, req, t),
        (["topics", t, "configs"], true, _) => topics::configs(ctx, t),
        (["topics", t, "messages"], true, _) => messages::page(ctx, req, t),
        (["topics", t, "produce"], true, _) => produce::form(ctx, req, t),
        (["topics", t, "produce"], _, true) => produce::submit(ctx, req, t),
        (["api", "topics", t, "tail"], true, _) => Ok(messages::tail(ctx, req, t)),
        (["api", "sparklines"], true, _) => Ok(topics::sparklines(ctx)),
        (["groups"], true, _) => groups::list(ctx),
        (["groups", g], true, _) => groups::detail(ctx, req, g),
        (["groups", g, "reset"], _, true) => groups::reset(ctx, req, g),
        (_, false, false) => Err(Fail {
            status: 405,
            message: format!("method {} is not supported", req.method),
        }),
        _ => Err(Fail::not_found(format!(
            "no page at /{}",
            esc_path(&req.segments)
        ))),
    }
}

fn esc_path(segments: &[String]) -> String {
    // Escaped again by `flash`; this only keeps the message on one line.
    segments.join("/").replace(['\n', '\r'], " ")
}

/// The path of a topic's page (`suffix` "" or "/messages", ...).
pub fn topic_path(topic: &str, suffix: &str) -> String {
    format!("/topics/{}{suffix}", http::encode_component(topic))
}

/// The path of a group's page.
pub fn group_path(group: &str, suffix: &str) -> String {
    format!("/groups/{}{suffix}", http::encode_component(group))
}

/// `<a href="path">text</a>` with the text escaped.
pub fn link(path: &str, text: &str) -> String {
    format!("<a href=\"{}\">{}</a>", esc(path), esc(text))
}
