//! Resuming reply streams from a `Last-Event-ID` (http-api.md, "Resuming, cancelling, and the
//! AI SDK stream"), with two gateways on one deployment, on every backend: a reply whose
//! connection dropped is finished from the other gateway, and one whose gateway was restarted
//! from that gateway once it is back, each with nothing missing and nothing repeated; a cursor
//! older than the retention is refused with `410 cursor_expired`.
//!
//! On NATS and RabbitMQ the gateways are two `chatfleet gateway` roles of one fleet. `chatfleet
//! dev` is one process with one in-process bus, so there the two gateways are two instances of
//! the gateway over the same in-process bus, store and worker, as `dev` wires them.

#[macro_use]
mod support;

use std::sync::Arc;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use support::{Backend, Options, SseEvent, TestApp, echo_of, wait_until_ready};
use tokio_util::sync::CancellationToken;

on_every_backend!(
    a_reply_whose_connection_dropped_resumes_on_another_gateway_with_nothing_missing_or_repeated,
    a_reply_resumes_from_its_gateway_after_that_gateway_was_restarted,
    a_cursor_is_served_while_its_events_are_retained_and_refused_with_410_once_they_expired,
);

/// A reply of the mock model here: 40 tokens 60 ms apart, long enough to be cut mid-way.
fn slow_replies() -> Options {
    Options { first_token_ms: 50, token_ms: 60, reply_tokens: 40, ..Options::default() }
}

/// How long any one reply may take to arrive in full.
const REPLY_WITHIN: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Two gateways of one deployment.

/// A deployment with two gateways.
enum Fleet {
    /// A fleet of roles on a broker, and the base URL of its second gateway.
    Broker(TestApp, String),
    /// `dev`'s parts, wired by hand so that two gateways share its in-process bus.
    Dev(DevFleet),
}

impl Fleet {
    async fn start(backend: Backend, options: Options) -> Fleet {
        match backend {
            Backend::Dev => Fleet::Dev(DevFleet::start(options).await),
            _ => {
                let mut app = TestApp::spawn_with(backend, options).await;
                let second = app.add_gateway().await;
                Fleet::Broker(app, second)
            }
        }
    }

    /// The two gateways' base URLs.
    fn gateways(&self) -> (String, String) {
        match self {
            Fleet::Broker(app, second) => (app.base.clone(), second.clone()),
            Fleet::Dev(dev) => (dev.gateways[0].0.clone(), dev.gateways[1].0.clone()),
        }
    }

    async fn stop_gateway(&mut self, base: &str) {
        match self {
            Fleet::Broker(app, _) => app.stop_gateway(base).await,
            Fleet::Dev(dev) => dev.stop_gateway(base).await,
        }
    }

    async fn restart_gateway(&mut self, base: &str) {
        match self {
            Fleet::Broker(app, _) => app.restart_gateway(base).await,
            Fleet::Dev(dev) => dev.restart_gateway(base).await,
        }
    }
}

/// The in-process bus, the embedded store, one worker with the stand-in model, and two
/// gateways, each of which can be stopped and started again on its address.
struct DevFleet {
    bus: Arc<bus::MemoryBus>,
    store: Arc<store::EmbeddedStore>,
    /// Each gateway's base URL and the token that stops it.
    gateways: Vec<(String, CancellationToken)>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl DevFleet {
    async fn start(options: Options) -> DevFleet {
        llm::openai::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store::EmbeddedStore::open(&dir.path().join("dev.redb")).unwrap());
        let partitions = schemas::PartitionCount::new(options.partitions).unwrap();
        let retention = options.event_retention_secs.map_or(bus::DEFAULT_EVENT_RETENTION, Duration::from_secs);
        let bus = Arc::new(bus::MemoryBus::with_event_retention(partitions, retention));
        let model = Arc::new(llm::stand_in::StandInModel::new(llm::mock_reply::MockSettings {
            first_token_delay: Duration::from_millis(options.first_token_ms),
            token_delay: Duration::from_millis(options.token_ms),
            reply_tokens: options.reply_tokens,
            echo_chars: 48,
        }));
        let stop = CancellationToken::new();
        let config = worker::WorkerConfig {
            worker_id: schemas::WorkerId::parse("dev-worker-0").unwrap(),
            ..worker::WorkerConfig::default()
        };
        let worker = worker::Worker::new(bus.clone(), store.clone(), model, config);
        tokio::spawn(worker.run(stop.clone().cancelled_owned()));
        let mut fleet = DevFleet { bus, store, gateways: Vec::new(), stop, _dir: dir };
        for _ in 0..2 {
            let base = format!("http://127.0.0.1:{}", testkit::free_port());
            let stop = fleet.serve(&base).await;
            fleet.gateways.push((base, stop));
        }
        fleet
    }

    /// Serves a gateway on `base`'s address until the returned token is cancelled.
    async fn serve(&self, base: &str) -> CancellationToken {
        let config = gateway::GatewayConfig { token_key: Some(b"resume-tests".to_vec()), ..Default::default() };
        let gateway = gateway::Gateway::build(self.bus.clone(), self.store.clone(), config, None).await.unwrap();
        let listener = tokio::net::TcpListener::bind(base.trim_start_matches("http://")).await.unwrap();
        let stop = self.stop.child_token();
        tokio::spawn(gateway.serve(listener, stop.clone().cancelled_owned()));
        wait_until_ready(&reqwest::Client::new(), base).await;
        stop
    }

    async fn stop_gateway(&mut self, base: &str) {
        let (_, stop) = self.gateways.iter().find(|(b, _)| b == base).expect("one of the gateways");
        stop.cancel();
        // The listener is gone once connections are refused.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while reqwest::get(format!("{base}/healthz")).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "the gateway at {base} did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn restart_gateway(&mut self, base: &str) {
        let stop = self.serve(base).await;
        self.gateways.iter_mut().find(|(b, _)| b == base).expect("one of the gateways").1 = stop;
    }
}

impl Drop for DevFleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// A client of the public API.

struct Session {
    id: String,
    token: String,
}

type Events = BoxStream<'static, SseEvent>;

async fn create_session(http: &reqwest::Client, base: &str) -> Session {
    let r = http.post(format!("{base}/v1/sessions")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 201, "creating a session");
    let body: Value = r.json().await.unwrap();
    Session { id: body["session_id"].as_str().unwrap().into(), token: body["token"].as_str().unwrap().into() }
}

fn events_of(response: reqwest::Response) -> Events {
    response
        .bytes_stream()
        .eventsource()
        .map(|e| {
            let e = e.expect("a well-formed event stream");
            SseEvent { event: e.event, id: e.id, data: serde_json::from_str(&e.data).expect("JSON data") }
        })
        .boxed()
}

async fn post_streaming(http: &reqwest::Client, base: &str, session: &Session, text: &str) -> Events {
    let r = http
        .post(format!("{base}/v1/sessions/{}/messages", session.id))
        .bearer_auth(&session.token)
        .header("Accept", "text/event-stream")
        .json(&json!({"text": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a streamed post");
    events_of(r)
}

/// `GET .../events` with `Last-Event-ID: last_id` (as the header, or as the query parameter).
async fn resume(
    http: &reqwest::Client,
    base: &str,
    session: &Session,
    last_id: &str,
    as_query: bool,
) -> reqwest::Response {
    let url = format!("{base}/v1/sessions/{}/events", session.id);
    let request = if as_query {
        http.get(url).query(&[("last_event_id", last_id)])
    } else {
        http.get(url).header("Last-Event-ID", last_id)
    };
    request.bearer_auth(&session.token).send().await.unwrap()
}

/// Reads until `n` deltas have arrived (and whatever came with them).
async fn read_deltas(events: &mut Events, n: usize) -> Vec<SseEvent> {
    let mut read = Vec::new();
    let reading = async {
        while read.iter().filter(|e: &&SseEvent| e.event == "delta").count() < n {
            read.push(events.next().await.expect("the stream went on"));
        }
    };
    tokio::time::timeout(REPLY_WITHIN, reading).await.expect("the deltas arrived in time");
    read
}

/// Reads until a `done` or `error` event.
async fn read_to_the_end(events: &mut Events) -> Vec<SseEvent> {
    let mut read = Vec::new();
    let reading = async {
        while let Some(event) = events.next().await {
            let last = event.event == "done" || event.event == "error";
            read.push(event);
            if last {
                break;
            }
        }
    };
    tokio::time::timeout(REPLY_WITHIN, reading).await.expect("the reply ended in time");
    read
}

/// Checks that the events of one reply, before and after a resume, are the whole reply once:
/// ids strictly increasing, delta indexes 0, 1, 2, ... without a gap or a repeat, the deltas
/// adding up to `done.text`, which answers `text`.
fn assert_whole_reply_once(before: &[SseEvent], after: &[SseEvent], text: &str) {
    let all: Vec<&SseEvent> = before.iter().chain(after).collect();
    for pair in all.windows(2) {
        assert!(pair[0].id < pair[1].id, "ids increase: {} then {}", pair[0].id, pair[1].id);
    }
    let indexes: Vec<u64> =
        all.iter().filter(|e| e.event == "delta").map(|e| e.data["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, (0..indexes.len() as u64).collect::<Vec<_>>(), "every delta once, in order");
    let done = all.last().expect("events");
    assert_eq!(done.event, "done", "the reply ends with done: {all:?}");
    let deltas: String = all.iter().filter(|e| e.event == "delta").map(|e| e.data["text"].as_str().unwrap()).collect();
    assert_eq!(deltas, done.data["text"].as_str().unwrap(), "the deltas add up to the reply");
    assert!(deltas.starts_with(&echo_of(text)), "the reply answers the message: {deltas:?}");
    assert!(!before.is_empty() && !after.is_empty(), "the reply was cut in two");
}

// ---------------------------------------------------------------------------------------------
// The tests.

async fn a_reply_whose_connection_dropped_resumes_on_another_gateway_with_nothing_missing_or_repeated(
    backend: Backend,
) {
    let fleet = Fleet::start(backend, slow_replies()).await;
    let (one, other) = fleet.gateways();
    let http = reqwest::Client::new();
    let session = create_session(&http, &one).await;
    let mut stream = post_streaming(&http, &one, &session, "a train enters a tunnel").await;
    let before = read_deltas(&mut stream, 5).await;

    drop(stream);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resumed = resume(&http, &other, &session, &before.last().unwrap().id, false).await;

    assert_eq!(resumed.status(), 200);
    let after = read_to_the_end(&mut events_of(resumed)).await;
    assert_whole_reply_once(&before, &after, "a train enters a tunnel");
}

async fn a_reply_resumes_from_its_gateway_after_that_gateway_was_restarted(backend: Backend) {
    let mut fleet = Fleet::start(backend, slow_replies()).await;
    let (one, _) = fleet.gateways();
    let http = reqwest::Client::new();
    let session = create_session(&http, &one).await;
    let mut stream = post_streaming(&http, &one, &session, "the gateway is redeployed").await;
    let before = read_deltas(&mut stream, 3).await;

    fleet.stop_gateway(&one).await;
    let cut = tokio::time::timeout(Duration::from_secs(5), stream.collect::<Vec<_>>()).await;
    fleet.restart_gateway(&one).await;
    let resumed = resume(&http, &one, &session, &before.last().unwrap().id, true).await;

    let cut = cut.expect("the stopped gateway closed the stream");
    assert!(cut.iter().all(|e| e.event != "done"), "the stream was cut before the reply ended");
    let before: Vec<SseEvent> = before.into_iter().chain(cut).collect();
    assert_eq!(resumed.status(), 200);
    let after = read_to_the_end(&mut events_of(resumed)).await;
    assert_whole_reply_once(&before, &after, "the gateway is redeployed");
}

async fn a_cursor_is_served_while_its_events_are_retained_and_refused_with_410_once_they_expired(backend: Backend) {
    let retention = 2;
    let options = Options { event_retention_secs: Some(retention), token_ms: 2, ..Options::default() };
    let fleet = Fleet::start(backend, options).await;
    let (one, other) = fleet.gateways();
    let http = reqwest::Client::new();
    let session = create_session(&http, &one).await;
    let first = read_to_the_end(&mut post_streaming(&http, &one, &session, "first").await).await;
    let (first_delta, first_done) = (&first[0].id, &first.last().unwrap().id);
    let fresh = resume(&http, &other, &session, first_delta, false).await;
    assert_eq!(fresh.status(), 200, "a cursor within the retention");
    drop(fresh);

    tokio::time::sleep(Duration::from_secs(retention) + Duration::from_millis(1500)).await;
    let second = read_to_the_end(&mut post_streaming(&http, &one, &session, "second").await).await;
    let expired = resume(&http, &other, &session, first_delta, false).await;
    let after_the_first_reply = resume(&http, &other, &session, first_done, false).await;

    assert_eq!(expired.status(), 410, "the rest of the first reply expired");
    let body: Value = expired.json().await.unwrap();
    assert_eq!(body["error"]["code"], "cursor_expired");
    assert_eq!(after_the_first_reply.status(), 200, "nothing after the first reply's done has expired");
    let replayed = read_to_the_end(&mut events_of(after_the_first_reply)).await;
    let ids = |events: &[SseEvent]| events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&replayed), ids(&second), "exactly the second reply's events");
}
