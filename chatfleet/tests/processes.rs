//! The fleet as operators run it: `chatfleet gateway` and two `chatfleet worker` processes
//! against NATS or RabbitMQ and a MongoDB-wire server, talking to `chatfleet mock-llm`.

#[macro_use]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Backend, Broker, assembled_text, echo_of};

on_every_broker!(a_gateway_and_two_worker_processes_serve_many_sessions);

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[String]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_chatfleet"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
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

async fn a_gateway_and_two_worker_processes_serve_many_sessions(backend: Backend) {
    llm::install_crypto_provider();
    let (broker, mongo) = tokio::join!(Broker::start(backend, false), testkit::MongoServer::start());
    let broker = broker.expect("a broker-backed fleet");
    let store = mongo.url_for_db("fleet");
    let (gateway_port, mock_port) = (testkit::free_port(), testkit::free_port());
    let worker_ports = [testkit::free_port(), testkit::free_port()];
    let s = |x: &str| x.to_owned();

    let _mock = spawn(&[
        s("mock-llm"),
        s("--listen"),
        format!("127.0.0.1:{mock_port}"),
        s("--first-token-ms"),
        s("20"),
        s("--token-ms"),
        s("2"),
    ]);
    let _gateway = spawn(&[
        s("gateway"),
        s("--listen"),
        format!("127.0.0.1:{gateway_port}"),
        s("--bus"),
        broker.url(),
        s("--store"),
        store.clone(),
    ]);
    let _workers: Vec<Proc> = worker_ports
        .iter()
        .map(|port| {
            spawn(&[
                s("worker"),
                s("--listen"),
                format!("127.0.0.1:{port}"),
                s("--bus"),
                broker.url(),
                s("--store"),
                store.clone(),
                s("--llm-base-url"),
                format!("http://127.0.0.1:{mock_port}/v1"),
                s("--model"),
                s("mock"),
            ])
        })
        .collect();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{gateway_port}");
    wait_http_ok(&http, &format!("{base}/readyz")).await;
    for port in worker_ports {
        wait_http_ok(&http, &format!("http://127.0.0.1:{port}/readyz")).await;
    }

    let results = futures::future::join_all((0..40).map(|i| {
        let (http, base) = (&http, &base);
        async move {
            let created: Value = http.post(format!("{base}/v1/sessions")).send().await.unwrap().json().await.unwrap();
            let (id, token) =
                (created["session_id"].as_str().unwrap().to_owned(), created["token"].as_str().unwrap().to_owned());
            let mut replies = Vec::new();
            for turn in 0..2 {
                let text = format!("session {i} turn {turn} {id}");
                let r = http
                    .post(format!("{base}/v1/sessions/{id}/messages"))
                    .bearer_auth(&token)
                    .header("Accept", "text/event-stream")
                    .json(&json!({"text": text}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let events = support::collect_events(r, Duration::from_secs(60)).await;
                replies.push((text, events));
            }
            let history: Value = http
                .get(format!("{base}/v1/sessions/{id}/messages"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (replies, history)
        }
    }))
    .await;

    for (replies, history) in results {
        let messages = history["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 4);
        for (turn, (text, events)) in replies.iter().enumerate() {
            let done = events.last().unwrap();
            assert_eq!(done.event, "done");
            let reply = done.data["text"].as_str().unwrap();
            assert!(reply.starts_with(&echo_of(text)), "{reply}");
            assert_eq!(assembled_text(events), reply);
            assert_eq!(messages[2 * turn]["text"], text.as_str());
            assert_eq!(messages[2 * turn + 1]["text"], reply);
        }
    }
}
