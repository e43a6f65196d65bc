//! The HTTP side of a run: sessions, streamed messages and history on a chatfleet gateway, and
//! streamed chat completions on an OpenAI-compatible endpoint, with the timing of every token.
//!
//! Both targets yield the same [`Reply`], so the runner and the report need not know which one
//! answered.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use anyhow::{Context, bail};
use eventsource_stream::{EventStreamError, Eventsource};
use futures::StreamExt;
use reqwest::header::{ACCEPT, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::plan::{Target, TargetKind};

/// Why a request or a reply failed; its [`fmt::Display`] is the key errors are counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server answered with this status (and, where its body said, this error code).
    Http { status: u16, code: Option<String> },
    /// The reply stream ended in an error event with this code.
    Event { code: String },
    /// No complete reply within `--timeout`.
    Timeout,
    /// The connection could not be made; the reason, where known, is one of a few short words
    /// (refused, too many open files, ...), so that the count per key stays meaningful.
    Connection(Option<&'static str>),
    /// The connection broke while the reply streamed.
    ConnectionLost,
    /// The server said something the client cannot read.
    Protocol(&'static str),
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http { status, code: Some(code) } => write!(f, "http {status} {code}"),
            Self::Http { status, code: None } => write!(f, "http {status}"),
            Self::Event { code } => write!(f, "error event {code}"),
            Self::Timeout => f.write_str("timeout"),
            Self::Connection(None) => f.write_str("connection failed"),
            Self::Connection(Some(reason)) => write!(f, "connection failed: {reason}"),
            Self::ConnectionLost => f.write_str("connection lost"),
            Self::Protocol(what) => write!(f, "protocol: {what}"),
        }
    }
}

impl ErrorKind {
    fn from_reqwest(error: &reqwest::Error) -> Self {
        if error.is_timeout() {
            Self::Timeout
        } else if error.is_body() || error.is_decode() {
            Self::ConnectionLost
        } else {
            Self::Connection(connection_failure_reason(error))
        }
    }
}

/// The reasons a load test runs into on its own side (descriptors, local ports) or meets at a
/// saturated target, told apart because each calls for a different remedy.
fn connection_failure_reason(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            // EMFILE and ENFILE on Linux and the BSDs.
            if matches!(io.raw_os_error(), Some(23 | 24)) {
                return Some("too many open files");
            }
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => Some("refused"),
                std::io::ErrorKind::ConnectionReset => Some("reset"),
                std::io::ErrorKind::TimedOut => Some("timed out"),
                std::io::ErrorKind::AddrNotAvailable => Some("no local port free"),
                _ => None,
            };
        }
        cause = current.source();
    }
    None
}

/// A gateway session the client holds.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub token: String,
}

/// One complete reply, with its timing measured from the message's scheduled start.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Until the first token.
    pub first_token: Option<Duration>,
    /// Until the end of the reply (`done` or `[DONE]`).
    pub total: Duration,
    /// Between each token and the next.
    pub gaps: Vec<Duration>,
    /// Tokens received, including any that a reset voided.
    pub tokens: u64,
    /// Reset events honoured.
    pub resets: u32,
    /// The reply's text: `done.text` from a gateway, the tokens joined from OpenAI.
    pub text: String,
    /// The id of the user message the gateway answered.
    pub message_id: Option<String>,
    /// Reply events that named another session.
    pub foreign_session_events: u64,
    /// What was inconsistent in the stream (out-of-order indexes, deltas not adding up).
    pub stream_problems: Vec<String>,
}

/// One message of a session's history, as `GET /v1/sessions/{id}/messages` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct HistoryMessage {
    pub message_id: String,
    pub role: String,
    pub text: String,
    #[serde(default)]
    pub reply_to: Option<String>,
}

/// One turn of an OpenAI conversation, resent as context with every later message.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub user: String,
    pub assistant: String,
}

/// The shared HTTP client and the target it talks to.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    target: Target,
    /// Limit for requests that are not reply streams (sessions, history).
    request_timeout: Duration,
}

impl Client {
    /// One client for the whole run: its pool keeps a connection per concurrent stream.
    pub fn new(target: Target, request_timeout: Duration) -> anyhow::Result<Self> {
        // reqwest is built without a default TLS provider; an https target needs one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            // Tokens are tiny writes each way; Nagle's algorithm would delay them and the
            // measured gaps with them.
            .tcp_nodelay(true)
            // Every concurrent stream holds its own HTTP/1.1 connection; none is capped, and
            // idle ones are all kept for the users' next turns.
            .pool_max_idle_per_host(usize::MAX)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(10))
            // A load test measures the target, never a proxy that the environment may name.
            .no_proxy()
            .user_agent(concat!("chatfleet-loadtest/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self { http, target, request_timeout })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Fails with one clear line when the target cannot be reached at all, so that a wrong URL
    /// is reported once instead of as ten thousand connection errors.
    pub async fn check_reachable(&self) -> anyhow::Result<()> {
        let (url, what) = match self.target.kind {
            TargetKind::Gateway => (format!("{}/healthz", self.target.url), "the gateway"),
            TargetKind::Openai => (format!("{}/models", self.target.url), "the OpenAI endpoint"),
        };
        let mut request = self.http.get(&url).timeout(Duration::from_secs(10));
        if self.target.kind == TargetKind::Openai
            && let Some(key) = &self.target.api_key
        {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|error| anyhow::anyhow!("cannot reach {what} at {}: {}", self.target.url, root_cause(&error)))?;
        // Any answer shows an OpenAI endpoint is there (it may want a key for listing models);
        // a chatfleet gateway always answers its health check with 200.
        if self.target.kind == TargetKind::Gateway && !response.status().is_success() {
            bail!(
                "{} does not look like a chatfleet gateway: GET /healthz answered {}",
                self.target.url,
                response.status()
            );
        }
        Ok(())
    }

    /// `POST /v1/sessions`, with the API key if one was given.
    pub async fn create_session(&self, user_label: &str) -> Result<Session, ErrorKind> {
        #[derive(Deserialize)]
        struct Created {
            session_id: String,
            token: String,
        }
        let mut request = self
            .http
            .post(format!("{}/v1/sessions", self.target.url))
            .timeout(self.request_timeout)
            .json(&json!({ "user": user_label }));
        if let Some(key) = &self.target.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| ErrorKind::from_reqwest(&e))?;
        if response.status().as_u16() != 201 {
            return Err(http_error(response).await);
        }
        let created: Created =
            response.json().await.map_err(|_| ErrorKind::Protocol("session answer is not the expected JSON"))?;
        Ok(Session { id: created.session_id, token: created.token })
    }

    /// `GET /v1/sessions/{id}/messages`.
    pub async fn history(&self, session: &Session) -> Result<Vec<HistoryMessage>, ErrorKind> {
        #[derive(Deserialize)]
        struct History {
            messages: Vec<HistoryMessage>,
        }
        let response = self
            .http
            .get(format!("{}/v1/sessions/{}/messages", self.target.url, session.id))
            .bearer_auth(&session.token)
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(|e| ErrorKind::from_reqwest(&e))?;
        if !response.status().is_success() {
            return Err(http_error(response).await);
        }
        let history: History =
            response.json().await.map_err(|_| ErrorKind::Protocol("history is not the expected JSON"))?;
        Ok(history.messages)
    }

    /// Sends one message to a gateway session and reads its reply events to the end.
    pub async fn gateway_message(
        &self,
        session: &Session,
        text: &str,
        client_message_id: &str,
        origin: Instant,
    ) -> Result<Reply, ErrorKind> {
        let response = self
            .http
            .post(format!("{}/v1/sessions/{}/messages", self.target.url, session.id))
            .header(ACCEPT, HeaderValue::from_static("text/event-stream"))
            .bearer_auth(&session.token)
            .json(&json!({ "text": text, "client_message_id": client_message_id }))
            .send()
            .await
            .map_err(|e| ErrorKind::from_reqwest(&e))?;
        if response.status().as_u16() != 200 {
            return Err(http_error(response).await);
        }

        let mut reply = Reply::default();
        let mut clock = TokenClock::new(origin);
        let mut text_so_far = String::new();
        let mut next_index = 0u64;
        let mut events = response.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| stream_error(&e))?;
            match event.event.as_str() {
                "delta" => {
                    let delta: DeltaEvent = parse_event(&event.data)?;
                    if delta.session_id != session.id {
                        reply.foreign_session_events += 1;
                        continue;
                    }
                    note_message_id(&mut reply, &delta.message_id);
                    clock.token(&mut reply);
                    if delta.index != next_index {
                        reply.stream_problems.push(format!("delta index {} where {next_index} was due", delta.index));
                    }
                    next_index = delta.index + 1;
                    text_so_far.push_str(&delta.text);
                }
                "reset" => {
                    let reset: ResetEvent = parse_event(&event.data)?;
                    if reset.session_id != session.id {
                        reply.foreign_session_events += 1;
                        continue;
                    }
                    note_message_id(&mut reply, &reset.message_id);
                    // The deltas so far are void: the reply starts again at index 0.
                    reply.resets += 1;
                    text_so_far.clear();
                    next_index = 0;
                }
                "done" => {
                    let done: DoneEvent = parse_event(&event.data)?;
                    if done.session_id != session.id {
                        reply.foreign_session_events += 1;
                        continue;
                    }
                    note_message_id(&mut reply, &done.message_id);
                    reply.total = origin.elapsed();
                    if text_so_far != done.text {
                        reply.stream_problems.push("the deltas since the last reset do not add up to done.text".into());
                    }
                    reply.text = done.text;
                    return Ok(reply);
                }
                "error" => {
                    let error: ErrorEvent = parse_event(&event.data)?;
                    if error.session_id != session.id {
                        reply.foreign_session_events += 1;
                        continue;
                    }
                    return Err(ErrorKind::Event { code: error.code });
                }
                // Event types added to the API later are not this client's business.
                _ => {}
            }
        }
        Err(ErrorKind::Protocol("stream ended before done"))
    }

    /// Sends one chat completion request (the conversation so far plus `text`) with streaming,
    /// and reads its chunks until `[DONE]`.
    pub async fn openai_message(&self, earlier: &[Exchange], text: &str, origin: Instant) -> Result<Reply, ErrorKind> {
        let mut messages = Vec::with_capacity(earlier.len() * 2 + 1);
        for exchange in earlier {
            messages.push(json!({ "role": "user", "content": exchange.user }));
            messages.push(json!({ "role": "assistant", "content": exchange.assistant }));
        }
        messages.push(json!({ "role": "user", "content": text }));
        let body = json!({
            "model": self.target.model,
            "messages": messages,
            "stream": true,
        });
        let mut request = self
            .http
            .post(format!("{}/chat/completions", self.target.url))
            .header(ACCEPT, HeaderValue::from_static("text/event-stream"))
            .json(&body);
        if let Some(key) = &self.target.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| ErrorKind::from_reqwest(&e))?;
        if !response.status().is_success() {
            return Err(http_error(response).await);
        }

        let mut reply = Reply::default();
        let mut clock = TokenClock::new(origin);
        let mut events = response.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| stream_error(&e))?;
            if event.data.trim() == "[DONE]" {
                reply.total = origin.elapsed();
                return Ok(reply);
            }
            let chunk: CompletionChunk = parse_event(&event.data)?;
            if let Some(error) = &chunk.error {
                return Err(ErrorKind::Event { code: openai_error_code(error).unwrap_or_else(|| "unknown".into()) });
            }
            // The opening role chunk, the finish chunk and the usage chunk carry no text.
            let content =
                chunk.choices.first().and_then(|choice| choice.delta.as_ref()).and_then(|d| d.content.as_deref());
            if let Some(content) = content.filter(|content| !content.is_empty()) {
                clock.token(&mut reply);
                reply.text.push_str(content);
            }
        }
        Err(ErrorKind::Protocol("stream ended before [DONE]"))
    }
}

/// Times tokens as they arrive.
struct TokenClock {
    origin: Instant,
    last: Option<Instant>,
}

impl TokenClock {
    fn new(origin: Instant) -> Self {
        Self { origin, last: None }
    }

    fn token(&mut self, reply: &mut Reply) {
        let now = Instant::now();
        match self.last {
            // The first token after a reset still follows a token the user saw, so its gap is
            // counted like any other: that wait is what a reset costs.
            Some(last) => reply.gaps.push(now - last),
            None => reply.first_token = Some(now - self.origin),
        }
        self.last = Some(now);
        reply.tokens += 1;
    }
}

fn note_message_id(reply: &mut Reply, message_id: &str) {
    match &reply.message_id {
        None => reply.message_id = Some(message_id.to_owned()),
        Some(known) if known != message_id => {
            reply.stream_problems.push(format!("events of message {message_id} in the reply to {known}"));
        }
        Some(_) => {}
    }
}

// The reply events and chunks are read as views borrowed from the event's text (copied only where
// a string holds escapes): the load generator reads every event of every reply, and what it
// spends per event is spent on the cores it shares with the target.

#[derive(Deserialize)]
struct DeltaEvent<'a> {
    #[serde(borrow)]
    session_id: Cow<'a, str>,
    #[serde(borrow)]
    message_id: Cow<'a, str>,
    index: u64,
    #[serde(borrow)]
    text: Cow<'a, str>,
}

#[derive(Deserialize)]
struct ResetEvent<'a> {
    #[serde(borrow)]
    session_id: Cow<'a, str>,
    #[serde(borrow)]
    message_id: Cow<'a, str>,
}

#[derive(Deserialize)]
struct DoneEvent<'a> {
    #[serde(borrow)]
    session_id: Cow<'a, str>,
    #[serde(borrow)]
    message_id: Cow<'a, str>,
    text: String,
}

#[derive(Deserialize)]
struct ErrorEvent<'a> {
    #[serde(borrow)]
    session_id: Cow<'a, str>,
    code: String,
}

/// The fields of a `chat.completion.chunk` the load generator reads; the rest is skipped.
#[derive(Deserialize)]
struct CompletionChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<CompletionChoice<'a>>,
    /// An error object sent in place of a chunk.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct CompletionChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<CompletionDelta<'a>>,
}

#[derive(Deserialize)]
struct CompletionDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

fn parse_event<'a, T: Deserialize<'a>>(data: &'a str) -> Result<T, ErrorKind> {
    serde_json::from_str(data).map_err(|_| ErrorKind::Protocol("event data is not the expected JSON"))
}

fn stream_error(error: &EventStreamError<reqwest::Error>) -> ErrorKind {
    match error {
        EventStreamError::Transport(error) if error.is_timeout() => ErrorKind::Timeout,
        EventStreamError::Transport(_) => ErrorKind::ConnectionLost,
        EventStreamError::Utf8(_) | EventStreamError::Parser(_) => ErrorKind::Protocol("malformed event stream"),
    }
}

/// The error kind of a non-success answer, with the code from its body where there is one:
/// chatfleet's `{"error": {"code"}}` or OpenAI's `{"error": {"code" or "type"}}`.
async fn http_error(response: reqwest::Response) -> ErrorKind {
    let status = response.status().as_u16();
    let code = match response.json::<Value>().await {
        Ok(body) => body.get("error").and_then(openai_error_code),
        Err(_) => None,
    };
    ErrorKind::Http { status, code }
}

fn openai_error_code(error: &Value) -> Option<String> {
    ["code", "type"].iter().find_map(|field| error.get(*field).and_then(Value::as_str)).map(str::to_owned)
}

/// The innermost cause of an error, which names what actually went wrong ("Connection refused")
/// rather than what was being attempted.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_read_as_short_keys() {
        assert_eq!(
            ErrorKind::Http { status: 503, code: Some("bus_unavailable".into()) }.to_string(),
            "http 503 bus_unavailable"
        );
        assert_eq!(ErrorKind::Http { status: 500, code: None }.to_string(), "http 500");
        assert_eq!(ErrorKind::Event { code: "model_unavailable".into() }.to_string(), "error event model_unavailable");
        assert_eq!(ErrorKind::Protocol("stream ended before done").to_string(), "protocol: stream ended before done");
    }

    #[test]
    fn openai_errors_are_keyed_by_code_or_else_type() {
        assert_eq!(
            openai_error_code(&json!({"code": "rate_limit_exceeded", "type": "requests"})).as_deref(),
            Some("rate_limit_exceeded")
        );
        assert_eq!(openai_error_code(&json!({"code": null, "type": "server_error"})).as_deref(), Some("server_error"));
        assert_eq!(openai_error_code(&json!({"message": "?"})), None);
    }
}
