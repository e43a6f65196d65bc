//! OpenTelemetry traces across processes: a gateway and a worker process export over OTLP/HTTP
//! to a loopback receiver (`deploy/tests/otlp_receiver.py`, which decodes the protobuf with
//! PyPI `opentelemetry-proto`), and one message shows up as one trace: the gateway's request,
//! its publish, the worker's handling (continued from the `traceparent` header the message
//! carried through the broker), the model call with its first token, and the store calls; and
//! the worker's log lines inside it carry its trace id. On NATS and on RabbitMQ.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s(x: &str) -> String {
    x.to_owned()
}

/// The OTLP receiver: every span it decoded, one JSON value per line, arriving on `spans`.
struct Receiver {
    _proc: Proc,
    endpoint: String,
    spans: mpsc::Receiver<Value>,
}

impl Receiver {
    fn start() -> Receiver {
        let port = testkit::free_port();
        let script = testkit::deploy::repo_root().join("deploy/tests/otlp_receiver.py");
        let mut child = Command::new(testkit::deploy::test_python())
            .arg(script)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the test Python runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("listening"), "the OTLP receiver starts");
        let (tx, spans) = mpsc::channel();
        std::thread::spawn(move || forward(lines, tx));
        Receiver { _proc: Proc(child), endpoint: format!("http://127.0.0.1:{port}"), spans }
    }

    /// Collects spans until `done` says the trace is complete, or `within` has passed.
    fn collect(&self, within: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut spans = Vec::new();
        while !done(&spans) && Instant::now() < deadline {
            if let Ok(span) = self.spans.recv_timeout(Duration::from_millis(100)) {
                spans.push(span);
            }
        }
        spans
    }
}

fn forward(lines: std::io::Lines<BufReader<ChildStdout>>, tx: mpsc::Sender<Value>) {
    for line in lines.map_while(Result::ok) {
        let span: Value = serde_json::from_str(&line).expect("the receiver prints JSON lines");
        if tx.send(span).is_err() {
            return;
        }
    }
}

/// Starts the binary with `args`, exporting traces to `endpoint`, its log lines (JSON) in `log`.
fn spawn_traced(args: &[String], endpoint: &str, log: &PathBuf) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_chatfleet"))
            .args(args)
            .env("RUST_LOG", "info")
            .env("CHATFLEET_LOG_FORMAT", "json")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the binary starts"),
    )
}

async fn wait_http_ok(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not answer 200 within 20 s");
}

fn named<'a>(spans: &'a [Value], service: &str, name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["service"] == service && s["name"] == name).collect()
}

/// Whether the spans hold a whole message's trace: a worker's handling under a gateway's request.
fn whole(spans: &[Value]) -> bool {
    named(spans, "chatfleet-gateway", "post_message").iter().any(|request| {
        let trace = &request["trace_id"];
        let worker_span = |name: &str| named(spans, "chatfleet-worker", name).iter().any(|s| &s["trace_id"] == trace);
        worker_span("message") && worker_span("llm.generate") && worker_span("store")
    })
}

async fn one_message_is_one_trace_across_the_gateway_and_worker_processes(bus: String) {
    llm::install_crypto_provider();
    let receiver = Receiver::start();
    let mongo = testkit::MongoServer::start().await;
    let logs = tempfile::tempdir().unwrap();
    let (mock_port, gateway_port, worker_port) = (testkit::free_port(), testkit::free_port(), testkit::free_port());
    let model = format!("http://127.0.0.1:{mock_port}/v1");
    let wiring = [s("--bus"), bus, s("--store"), mongo.url_for_db("fleet")];
    let _mock = Proc(
        Command::new(env!("CARGO_BIN_EXE_chatfleet"))
            .args(["mock-llm", "--listen", &format!("127.0.0.1:{mock_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let gateway_args = [s("gateway"), s("--listen"), format!("127.0.0.1:{gateway_port}")];
    let _gateway =
        spawn_traced(&[&gateway_args[..], &wiring].concat(), &receiver.endpoint, &logs.path().join("gateway"));
    let worker_args = [s("worker"), s("--listen"), format!("127.0.0.1:{worker_port}"), s("--worker-id"), s("w0")];
    let model_args = [s("--llm-base-url"), model.clone(), s("--model"), s("mock")];
    let worker_log = logs.path().join("worker");
    let _worker = spawn_traced(&[&worker_args[..], &wiring, &model_args].concat(), &receiver.endpoint, &worker_log);
    let http = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{gateway_port}");
    wait_http_ok(&http, &format!("{model}/models")).await;
    wait_http_ok(&http, &format!("{gateway}/readyz")).await;
    wait_http_ok(&http, &format!("http://127.0.0.1:{worker_port}/readyz")).await;

    let session: Value = http.post(format!("{gateway}/v1/sessions")).send().await.unwrap().json().await.unwrap();
    let r = http
        .post(format!("{gateway}/v1/sessions/{}/messages", session["session_id"].as_str().unwrap()))
        .bearer_auth(session["token"].as_str().unwrap())
        .json(&json!({"text": "trace me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let message_id = r.json::<Value>().await.unwrap()["message_id"].as_str().unwrap().to_owned();
    let spans = tokio::task::spawn_blocking(move || receiver.collect(Duration::from_secs(30), whole)).await.unwrap();

    assert!(whole(&spans), "one trace from the gateway's request to the worker's model and store calls: {spans:#?}");
    let request = named(&spans, "chatfleet-gateway", "post_message")[0];
    let trace = request["trace_id"].as_str().unwrap();
    let in_trace = |service: &str, name: &str| -> Vec<&Value> {
        named(&spans, service, name).into_iter().filter(|s| s["trace_id"] == trace).collect()
    };
    let publish = in_trace("chatfleet-gateway", "bus.publish");
    let handling = in_trace("chatfleet-worker", "message");
    let generation = in_trace("chatfleet-worker", "llm.generate");
    assert_eq!(publish.len(), 1, "{spans:#?}");
    assert_eq!(publish[0]["parent_span_id"], request["span_id"], "the publish is part of the request");
    assert_eq!(handling.len(), 1, "{spans:#?}");
    assert_eq!(handling[0]["parent_span_id"], publish[0]["span_id"], "the worker continues from the publish");
    assert!(
        generation.iter().any(|g| g["events"].as_array().unwrap().contains(&json!("first_token"))),
        "{generation:#?}"
    );
    assert!(!in_trace("chatfleet-worker", "store").is_empty());
    let worker_lines = std::fs::read_to_string(&worker_log).unwrap();
    let traced_line = worker_lines.lines().find(|l| l.contains(&message_id) && l.contains(trace));
    assert!(traced_line.is_some(), "a worker log line of the message carries its trace id {trace}:\n{worker_lines}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_one_message_is_one_trace_across_the_gateway_and_worker_processes() {
    let nats = testkit::NatsServer::start().await;
    one_message_is_one_trace_across_the_gateway_and_worker_processes(nats.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_one_message_is_one_trace_across_the_gateway_and_worker_processes() {
    let vhost = testkit::RabbitVhost::create().await;
    one_message_is_one_trace_across_the_gateway_and_worker_processes(vhost.url()).await;
}
