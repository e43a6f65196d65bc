//! The `webhooks` scenario: N signed webhook conversations at once, each one message, sent to
//! a gateway's `POST /v1/channels/webhooks/{integration}` signed by Standard Webhooks 1.0, and
//! their replies received by a webhook receiver the load generator runs itself (the
//! integration's `url` in the gateway's channels file points at it). Every delivery's signature
//! is verified; the report gives the end-to-end delivery latency (from sending the message to
//! receiving its signed reply), and counts replies missing, delivered more than once (by
//! `webhook-id`), unsigned or wrongly signed, or not matching what was sent.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::report::{LatencyHistogram, LatencySummary};

/// Messages in flight at once (each a short request: the reply comes back separately).
const SEND_CONCURRENCY: usize = 256;
/// How far a delivery's `webhook-timestamp` may be from the receiver's clock.
const TOLERANCE_SECS: i64 = 5 * 60;

/// Everything a webhooks run needs to know.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The gateway's root, without a trailing slash.
    pub url: String,
    /// The integration's name (`[webhooks.<name>]` in the gateway's channels file).
    pub integration: String,
    /// Its `whsec_...` secret: signs the messages and verifies the deliveries.
    pub secret: String,
    /// Where the receiver listens; the integration's `url` must reach it.
    pub listen: SocketAddr,
    /// How many conversations (one message each).
    pub conversations: u64,
    /// Names this run's conversations and message ids.
    pub run_id: String,
    /// The words after each message's marker.
    pub words: String,
    /// Longest wait for each request, and for the last deliveries after the last message sent.
    pub timeout: Duration,
}

/// What the run found.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookReport {
    pub scenario: String,
    pub target: String,
    pub receiver: String,
    pub run_id: String,
    pub started_at: String,
    #[serde(rename = "duration_s", serialize_with = "secs")]
    pub duration: Duration,
    pub interrupted: bool,
    pub counts: WebhookCounts,
    /// From sending a message to receiving its signed reply.
    pub delivery_latency: LatencySummary,
    /// From sending a message to the gateway's `202`.
    pub accept_latency: LatencySummary,
    /// Deliveries per second, from the first message sent to the last reply received.
    pub deliveries_per_s: f64,
    /// A few examples of what went wrong.
    pub problems: Vec<String>,
    pub passed: bool,
}

/// Counts of a webhooks run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WebhookCounts {
    pub planned: u64,
    /// Messages the gateway accepted (`202`).
    pub accepted: u64,
    /// Messages the gateway refused or that failed to send.
    pub refused: u64,
    /// Accepted messages whose reply arrived, verified.
    pub delivered: u64,
    /// Accepted messages whose reply never arrived.
    pub missing: u64,
    /// Deliveries repeating a `webhook-id` already received.
    pub duplicates: u64,
    /// Deliveries whose signature was missing, wrong or stale.
    pub bad_signatures: u64,
    /// Deliveries of no message of this run, or naming another message than the one sent.
    pub unexpected: u64,
    /// Deliveries of `message.error`.
    pub errors: u64,
}

fn secs<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

/// A conversation's message: when it was sent and what the gateway answered.
#[derive(Debug, Clone, Default)]
struct Sent {
    at: Option<Instant>,
    /// How long the gateway took to answer `202`.
    accepted_after: Option<Duration>,
    message_id: Option<String>,
}

/// What the receiver and the senders share.
struct Book {
    key: Vec<u8>,
    run_id: String,
    sent: Mutex<Vec<Sent>>,
    /// Reply ids received, with the conversation they answered.
    seen: Mutex<HashMap<String, usize>>,
    /// Verified deliveries, by conversation: arrival and the message id named.
    arrivals: Mutex<Vec<Option<(Instant, String)>>>,
    counts: Mutex<WebhookCounts>,
    problems: Mutex<Vec<String>>,
    changed: Notify,
}

impl Book {
    fn problem(&self, problem: String) {
        let mut problems = self.problems.lock().expect("never poisoned");
        if problems.len() < 20 {
            problems.push(problem);
        }
    }

    fn count(&self, change: impl FnOnce(&mut WebhookCounts)) {
        change(&mut self.counts.lock().expect("never poisoned"));
    }
}

/// The HMAC key of a `whsec_...` secret.
pub fn signing_key(secret: &str) -> anyhow::Result<Vec<u8>> {
    let encoded = secret.strip_prefix("whsec_").context("the webhook secret must start with whsec_")?;
    STANDARD.decode(encoded).context("the part of the webhook secret after whsec_ is not base64")
}

/// `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Whether the headers carry a valid, fresh signature of `body`.
fn verified(key: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<String, &'static str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signatures)) =
        (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"))
    else {
        return Err("unsigned");
    };
    let timestamp: i64 = timestamp.parse().map_err(|_| "a malformed webhook-timestamp")?;
    if (OffsetDateTime::now_utc().unix_timestamp() - timestamp).abs() > TOLERANCE_SECS {
        return Err("a stale webhook-timestamp");
    }
    let expected = sign(key, id, timestamp, body);
    // A constant-time comparison would matter to a real receiver; here the generator only counts.
    if signatures.split(' ').any(|s| s == expected) { Ok(id.to_owned()) } else { Err("a wrong signature") }
}

fn conversation_id(run_id: &str, index: usize) -> String {
    format!("lt-{run_id}-{index}")
}

/// The receiver's one route: verify, match to the conversation, record.
async fn receive(State(book): State<Arc<Book>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let arrived = Instant::now();
    let id = match verified(&book.key, &headers, &body) {
        Ok(id) => id,
        Err(why) => {
            book.count(|c| c.bad_signatures += 1);
            book.problem(format!("a delivery with {why}"));
            // Answered 2xx: the gateway would otherwise send it again and again.
            return StatusCode::NO_CONTENT;
        }
    };
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let conversation = reply["conversation_id"].as_str().unwrap_or_default();
    let prefix = format!("lt-{}-", book.run_id);
    let index = conversation.strip_prefix(&prefix).and_then(|i| i.parse::<usize>().ok());
    let Some(index) = index.filter(|i| *i < book.arrivals.lock().expect("never poisoned").len()) else {
        book.count(|c| c.unexpected += 1);
        book.problem(format!("a delivery for conversation {conversation:?}, not one of this run"));
        return StatusCode::NO_CONTENT;
    };
    if book.seen.lock().expect("never poisoned").insert(id.clone(), index).is_some() {
        book.count(|c| c.duplicates += 1);
        return StatusCode::NO_CONTENT;
    }
    if reply["type"] == "message.error" {
        book.count(|c| c.errors += 1);
        book.problem(format!("conversation {index}: message.error {}", reply["code"]));
    }
    let message_id = reply["message_id"].as_str().unwrap_or_default().to_owned();
    book.arrivals.lock().expect("never poisoned")[index] = Some((arrived, message_id));
    book.changed.notify_waiters();
    StatusCode::NO_CONTENT
}

/// Sends conversation `index`'s message, signed.
async fn send(http: &reqwest::Client, config: &WebhookConfig, book: &Book, index: usize) {
    let body = serde_json::json!({
        "conversation_id": conversation_id(&config.run_id, index),
        "text": format!("[lt-{}-{index}] {}", config.run_id, config.words),
    })
    .to_string();
    let id = format!("msg_lt_{}_{index}", config.run_id);
    let timestamp = OffsetDateTime::now_utc().unix_timestamp();
    let signature = sign(&book.key, &id, timestamp, body.as_bytes());
    let url = format!("{}/v1/channels/webhooks/{}", config.url, config.integration);
    let started = Instant::now();
    book.sent.lock().expect("never poisoned")[index].at = Some(started);
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    let accepted = match response {
        Ok(r) if r.status() == StatusCode::ACCEPTED => r.json::<serde_json::Value>().await.ok(),
        Ok(r) => {
            book.problem(format!("conversation {index}: the gateway answered {}", r.status()));
            None
        }
        Err(e) => {
            book.problem(format!("conversation {index}: {e}"));
            None
        }
    };
    match accepted.and_then(|a| a["message_id"].as_str().map(str::to_owned)) {
        Some(message_id) => {
            let mut sent = book.sent.lock().expect("never poisoned");
            sent[index].message_id = Some(message_id);
            sent[index].accepted_after = Some(started.elapsed());
            drop(sent);
            book.count(|c| c.accepted += 1);
        }
        None => book.count(|c| c.refused += 1),
    }
}

/// Runs the scenario until every accepted message's reply has arrived, `timeout` after the last
/// message was sent, or `shutdown`.
pub async fn run(config: &WebhookConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<WebhookReport> {
    let Ok(n) = usize::try_from(config.conversations) else { bail!("too many conversations") };
    if n == 0 {
        bail!("--conversations must be at least 1");
    }
    let book = Arc::new(Book {
        key: signing_key(&config.secret)?,
        run_id: config.run_id.clone(),
        sent: Mutex::new(vec![Sent::default(); n]),
        seen: Mutex::new(HashMap::new()),
        arrivals: Mutex::new(vec![None; n]),
        counts: Mutex::new(WebhookCounts { planned: config.conversations, ..WebhookCounts::default() }),
        problems: Mutex::new(Vec::new()),
        changed: Notify::new(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen for deliveries on {}", config.listen))?;
    let receiver = listener.local_addr()?;
    let app = Router::new().fallback(axum::routing::post(receive)).with_state(book.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    // reqwest is built without a default TLS provider (as in `client.rs`).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().timeout(config.timeout).build()?;

    let started = Instant::now();
    let started_at = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
    let permits = Arc::new(Semaphore::new(SEND_CONCURRENCY));
    let mut sending = tokio::task::JoinSet::new();
    for index in 0..n {
        let permit = permits.clone().acquire_owned().await.expect("never closed");
        let (http, config, book) = (http.clone(), config.clone(), book.clone());
        sending.spawn(async move {
            send(&http, &config, &book, index).await;
            drop(permit);
        });
    }
    let interrupted = {
        let waiting = async {
            while sending.join_next().await.is_some() {}
            let deadline = Instant::now() + config.timeout;
            while !all_arrived(&book) {
                let changed = book.changed.notified();
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = waiting => false,
            _ = shutdown => true,
        }
    };
    // Late repeats are counted too: a moment for deliveries already on their way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.abort();
    Ok(report(config, &book, receiver, started, started_at, interrupted))
}

/// Whether every accepted message's reply arrived.
fn all_arrived(book: &Book) -> bool {
    let sent = book.sent.lock().expect("never poisoned");
    let arrivals = book.arrivals.lock().expect("never poisoned");
    sent.iter().zip(arrivals.iter()).all(|(s, a)| s.message_id.is_none() || a.is_some())
        && sent.iter().all(|s| s.at.is_some())
}

fn report(
    config: &WebhookConfig,
    book: &Book,
    receiver: SocketAddr,
    started: Instant,
    started_at: String,
    interrupted: bool,
) -> WebhookReport {
    let mut counts = book.counts.lock().expect("never poisoned").clone();
    let (mut delivery, mut accept) = (LatencyHistogram::default(), LatencyHistogram::default());
    let mut last = started;
    let sent = book.sent.lock().expect("never poisoned").clone();
    let arrivals = book.arrivals.lock().expect("never poisoned").clone();
    for (index, (sent, arrival)) in sent.iter().zip(arrivals).enumerate() {
        if let Some(after) = sent.accepted_after {
            accept.record(after);
        }
        match (&sent.message_id, sent.at, arrival) {
            (Some(expected), Some(at), Some((arrived, named))) => {
                if &named != expected {
                    counts.unexpected += 1;
                    book.problem(format!("conversation {index}: the reply names message {named}, not {expected}"));
                }
                counts.delivered += 1;
                delivery.record(arrived.saturating_duration_since(at));
                last = last.max(arrived);
            }
            (Some(_), _, None) => counts.missing += 1,
            _ => {}
        }
    }
    let span = last.saturating_duration_since(started).as_secs_f64();
    let passed = !interrupted
        && counts.refused == 0
        && counts.missing == 0
        && counts.bad_signatures == 0
        && counts.unexpected == 0
        && counts.errors == 0
        && counts.delivered == counts.planned;
    WebhookReport {
        scenario: format!("webhooks ({} conversations, integration {})", config.conversations, config.integration),
        target: config.url.clone(),
        receiver: format!("http://{receiver}/"),
        run_id: config.run_id.clone(),
        started_at,
        duration: started.elapsed(),
        interrupted,
        deliveries_per_s: if span > 0.0 { counts.delivered as f64 / span } else { 0.0 },
        counts,
        delivery_latency: delivery.summary(),
        accept_latency: accept.summary(),
        problems: book.problems.lock().expect("never poisoned").clone(),
        passed,
    }
}

impl WebhookReport {
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// The summary printed at the end of a run.
    pub fn summary_table(&self) -> String {
        let mut out = String::new();
        let c = &self.counts;
        let _ = writeln!(out, "{:<22}{}", "scenario", self.scenario);
        let _ = writeln!(out, "{:<22}gateway {}, receiver {}", "target", self.target, self.receiver);
        let _ = writeln!(out, "{:<22}{}  (started {})", "run id", self.run_id, self.started_at);
        let interrupted = if self.interrupted { "  (interrupted)" } else { "" };
        let _ = writeln!(out, "{:<22}{:.2} s{interrupted}", "duration", self.duration.as_secs_f64());
        let _ =
            writeln!(out, "{:<22}{} planned, {} accepted, {} refused", "messages", c.planned, c.accepted, c.refused);
        let _ = writeln!(
            out,
            "{:<22}{} delivered, {} missing, {} duplicates, {} badly signed, {} unexpected, {} errors",
            "deliveries", c.delivered, c.missing, c.duplicates, c.bad_signatures, c.unexpected, c.errors
        );
        let _ = writeln!(out, "{:<22}{:.1} deliveries/s", "throughput", self.deliveries_per_s);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<22}{:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, s) in [("message to delivery", &self.delivery_latency), ("message accepted", &self.accept_latency)] {
            let _ = writeln!(
                out,
                "{name:<22}{:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
            );
        }
        for problem in &self.problems {
            let _ = writeln!(out, "problem: {problem}");
        }
        let _ = writeln!(out, "{:<22}{}", "result", if self.passed { "PASSED" } else { "FAILED" });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks_known_answer() {
        // The example of the Standard Webhooks specification's reference libraries.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;

        let signature = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);

        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_secret_without_its_prefix_is_refused() {
        assert!(signing_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
    }
}
