//! The container image of `deploy/Dockerfile`, as built by `deploy/build-image.sh` (and by
//! `scripts/test.sh`, which names it in `CHATFLEET_TEST_IMAGE`): it runs as a non-root user with
//! no shell, and a gateway and a worker started from it (podman, host network, read-only root)
//! against NATS answer a message.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn image() -> String {
    std::env::var("CHATFLEET_TEST_IMAGE").unwrap_or_else(|_| {
        panic!(
            "CHATFLEET_TEST_IMAGE is not set: run `scripts/test.sh`, which builds the image, or \
             `deploy/build-image.sh --profile image-test --tag localhost/chatfleet:test` and set it"
        )
    })
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman").args(args).stdin(Stdio::null()).output().expect("podman runs (scripts/test.sh installs it)")
}

/// A container removed on drop; its log is shown if the test fails while it runs.
struct Container(String);

impl Container {
    /// `podman run -d` of the image on the host network, read-only, with `env` and `args`.
    fn run(name: &str, env: &[(&str, String)], args: &[&str]) -> Container {
        let name = format!("chatfleet-test-{name}-{}", std::process::id());
        let image = image();
        let mut command = vec!["run", "-d", "--rm", "--name", &name, "--network", "host", "--read-only"];
        let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for pair in &pairs {
            command.extend(["-e", pair.as_str()]);
        }
        command.push(&image);
        command.extend(args);
        let out = podman(&command);
        assert!(out.status.success(), "podman run {name}: {}", String::from_utf8_lossy(&out.stderr));
        Container(name)
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.0]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.0, self.logs());
        }
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

async fn wait_http_ok(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{url} did not answer 200 within 30 s");
}

#[test]
fn the_image_runs_as_a_non_root_user_and_has_no_shell() {
    let image = image();

    let inspect = podman(&["image", "inspect", &image]);
    let shell = podman(&["run", "--rm", "--entrypoint", "/bin/sh", &image, "-c", "true"]);

    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let config: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(config[0]["Config"]["User"], "65532:65532");
    assert_eq!(config[0]["Config"]["Entrypoint"], json!(["/chatfleet"]));
    assert!(!shell.status.success(), "the image has a shell");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_and_a_worker_from_the_image_answer_a_message_over_nats() {
    llm::install_crypto_provider();
    let (nats, mongo) = tokio::join!(testkit::NatsServer::start(), testkit::MongoServer::start());
    let (mock_port, gateway_port, worker_port) = (testkit::free_port(), testkit::free_port(), testkit::free_port());
    // A host name rather than an address, so that name resolution inside the image is exercised.
    let bus = format!("nats://localhost:{}", nats.port());
    let store = mongo.url_for_db("fleet");
    let model = format!("http://127.0.0.1:{mock_port}/v1");
    let wiring = [("CHATFLEET_BUS", bus), ("CHATFLEET_STORE", store), ("RUST_LOG", "warn".to_owned())];
    let mock = Container::run(
        "mock",
        &[("RUST_LOG", "warn".into())],
        &["mock-llm", "--listen", &format!("127.0.0.1:{mock_port}")],
    );
    let gateway_env = [&wiring[..], &[("CHATFLEET_LISTEN", format!("127.0.0.1:{gateway_port}"))]].concat();
    let gateway = Container::run("gateway", &gateway_env, &["gateway"]);
    let worker_env = [
        &wiring[..],
        &[
            ("CHATFLEET_LISTEN", format!("127.0.0.1:{worker_port}")),
            ("OPENAI_BASE_URL", model.clone()),
            ("CHATFLEET_MODEL", "mock".into()),
        ],
    ]
    .concat();
    let worker = Container::run("worker", &worker_env, &["worker"]);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{gateway_port}");
    wait_http_ok(&http, &format!("{model}/models")).await;
    wait_http_ok(&http, &format!("{base}/readyz")).await;
    wait_http_ok(&http, &format!("http://127.0.0.1:{worker_port}/readyz")).await;

    let session: Value = http.post(format!("{base}/v1/sessions")).send().await.unwrap().json().await.unwrap();
    let reply = http
        .post(format!("{base}/v1/sessions/{}/messages", session["session_id"].as_str().unwrap()))
        .bearer_auth(session["token"].as_str().unwrap())
        .header("Accept", "text/event-stream")
        .json(&json!({"text": "hello from a container"}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let status = reply.status();
    let body = reply.text().await.unwrap();

    assert_eq!(status, 200, "{body}");
    assert!(body.contains("event: done"), "the reply ends with done: {body}");
    drop((mock, gateway, worker));
}
