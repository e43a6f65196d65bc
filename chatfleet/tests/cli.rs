//! Start-up as an operator sees it: the real binary, its help, one clear line for every
//! setting that is wrong, and `chatfleet` with no arguments as a new user first runs it.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Output};

fn chatfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatfleet"))
        .args(args)
        .env_remove("CHATFLEET_BUS")
        .env_remove("CHATFLEET_STORE")
        .env_remove("OPENAI_BASE_URL")
        .env("RUST_LOG", "off")
        .output()
        .expect("the binary runs")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

fn assert_one_clear_line(out: &Output, mentions: &[&str]) {
    let err = stderr_of(out);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(err.lines().count(), 1, "one line, not a backtrace: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for m in mentions {
        assert!(err.contains(m), "{err:?} should mention {m:?}");
    }
}

#[test]
fn help_explains_every_role() {
    let out = chatfleet(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);

    assert!(out.status.success());
    for role in ["dev", "gateway", "worker", "mock-llm"] {
        assert!(help.contains(role), "{help}");
    }
    let worker_help = String::from_utf8_lossy(&chatfleet(&["worker", "--help"]).stdout).to_string();
    for flag in [
        "--bus",
        "--store",
        "--llm-base-url",
        "--llm-api-key",
        "--model",
        "--partitions",
        "CHATFLEET_BUS",
        "OPENAI_BASE_URL",
    ] {
        assert!(worker_help.contains(flag), "worker --help lacks {flag}");
    }
}

#[test]
fn a_channels_file_naming_a_missing_variable_ends_start_up_with_one_line_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("channels.toml");
    std::fs::write(
        &path,
        "[webhooks.acme]\nsecret = \"${CHATFLEET_TEST_UNSET_SECRET}\"\nurl = \"http://127.0.0.1:9/\"\n",
    )
    .unwrap();
    let store = dir.path().join("dev.redb");

    let out = chatfleet(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--store",
        store.to_str().unwrap(),
        "--channels",
        path.to_str().unwrap(),
    ]);

    assert_one_clear_line(&out, &["--channels", "webhooks.acme.secret", "CHATFLEET_TEST_UNSET_SECRET"]);
}

#[test]
fn a_channels_file_with_an_unknown_key_ends_start_up_without_showing_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("channels.toml");
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    std::fs::write(
        &path,
        format!("[webhooks.acme]\nsecret = \"{secret}\"\nurl = \"http://127.0.0.1:9/\"\nretries = 3\n"),
    )
    .unwrap();
    let store = dir.path().join("dev.redb");

    let out = chatfleet(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--store",
        store.to_str().unwrap(),
        "--channels",
        path.to_str().unwrap(),
    ]);

    assert_one_clear_line(&out, &["[webhooks.acme]", "retries"]);
    assert!(!stderr_of(&out).contains("MfKQ9r8"));
}

#[test]
fn an_unknown_flag_is_refused() {
    let out = chatfleet(&["gateway", "--no-such-flag"]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("--no-such-flag"));
}

#[test]
fn a_bad_bus_url_names_the_setting() {
    let out = chatfleet(&["gateway", "--bus", "kafka://x", "--store", "mongodb://127.0.0.1:1"]);
    assert_one_clear_line(&out, &["--bus", "kafka://x"]);
}

#[tokio::test]
async fn an_unreachable_bus_ends_start_up_with_one_line() {
    let mongo = testkit::MongoServer::start().await;
    let (bus, store) = (format!("nats://127.0.0.1:{}", testkit::free_port()), mongo.url());
    let out =
        tokio::task::spawn_blocking(move || chatfleet(&["gateway", "--bus", &bus, "--store", &store])).await.unwrap();
    assert_one_clear_line(&out, &["--bus", "cannot reach NATS"]);
}

#[tokio::test]
async fn an_unreachable_rabbitmq_ends_start_up_with_one_line() {
    let mongo = testkit::MongoServer::start().await;
    let (bus, store) = (format!("amqp://guest:guest@127.0.0.1:{}/%2f", testkit::free_port()), mongo.url());
    let out =
        tokio::task::spawn_blocking(move || chatfleet(&["gateway", "--bus", &bus, "--store", &store])).await.unwrap();
    assert_one_clear_line(&out, &["--bus", "cannot reach RabbitMQ"]);
}

#[tokio::test]
async fn a_rabbitmq_queue_declared_with_other_settings_ends_start_up_with_one_line() {
    let (vhost, mongo) = tokio::join!(testkit::RabbitVhost::create(), testkit::MongoServer::start());
    // Someone made partition 0's queue a plain classic queue.
    let connection = lapin::Connection::connect(&vhost.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare("chatfleet.in.0".into(), durable, Default::default()).await.unwrap();
    let (bus, store) = (vhost.url(), mongo.url());
    let out =
        tokio::task::spawn_blocking(move || chatfleet(&["gateway", "--bus", &bus, "--store", &store])).await.unwrap();
    assert_one_clear_line(&out, &["--bus", "chatfleet.in.0", "other settings"]);
}

#[test]
fn an_unreachable_store_ends_start_up_with_one_line() {
    let out = chatfleet(&[
        "gateway",
        "--bus",
        "nats://127.0.0.1:4222",
        "--store",
        "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300",
    ]);
    assert_one_clear_line(&out, &["--store", "127.0.0.1:1"]);
}

#[test]
fn the_gateway_refuses_the_embedded_store() {
    let out = chatfleet(&["gateway", "--bus", "nats://127.0.0.1:4222", "--store", "/tmp/x.redb"]);
    assert_one_clear_line(&out, &["--store", "chatfleet dev"]);
}

#[test]
fn a_worker_without_a_model_is_refused() {
    let out = chatfleet(&["worker", "--bus", "nats://127.0.0.1:4222", "--store", "mongodb://127.0.0.1:1"]);
    assert_one_clear_line(&out, &["--llm-base-url", "OPENAI_BASE_URL"]);
}

#[test]
fn the_partition_count_is_bounded() {
    let out = chatfleet(&["gateway", "--bus", "nats://x:1", "--store", "mongodb://x", "--partitions", "0"]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("--partitions"));
}

#[test]
fn an_unknown_double_texting_policy_is_refused_naming_the_valid_ones() {
    let out = chatfleet(&["gateway", "--bus", "nats://x:1", "--store", "mongodb://x", "--double-texting", "later"]);

    let err = stderr_of(&out);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(err.contains("--double-texting"), "{err}");
    assert!(err.contains("enqueue, reject, interrupt"), "{err}");
}

#[test]
fn a_replica_count_other_than_auto_or_one_to_five_is_refused_naming_the_valid_ones() {
    let out = chatfleet(&["status", "--bus", "nats://x:1", "--nats-replicas", "7"]);

    let err = stderr_of(&out);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(err.contains("--nats-replicas") && err.contains("auto or a number from 1 to 5"), "{err}");
}

#[tokio::test]
async fn three_nats_replicas_on_a_single_server_end_start_up_with_one_line() {
    let (nats, mongo) = tokio::join!(testkit::NatsServer::start(), testkit::MongoServer::start());
    let (bus, store) = (nats.url(), mongo.url());
    let out = tokio::task::spawn_blocking(move || {
        chatfleet(&["gateway", "--bus", &bus, "--store", &store, "--nats-replicas", "3"])
    })
    .await
    .unwrap();
    assert_one_clear_line(&out, &["--nats-replicas", "not part of one"]);
}

/// A stand-in that greets like nats-server 2.9.10 and answers pings, which is all a client
/// sees before it checks the version.
fn old_nats_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let info = format!(
                    "INFO {{\"server_id\":\"old\",\"server_name\":\"old\",\"version\":\"2.9.10\",\"proto\":1,\"go\":\"go1.19\",\
                     \"host\":\"127.0.0.1\",\"port\":{port},\"headers\":true,\"max_payload\":1048576,\"jetstream\":true,\"client_id\":1}}\r\n"
                );
                let _ = stream.write_all(info.as_bytes());
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if line.starts_with("PING") {
                        let _ = stream.write_all(b"PONG\r\n");
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn nats_server_older_than_2_11_is_refused_at_start_up() {
    let port = old_nats_server();
    let mongo = testkit::MongoServer::start().await;
    let url = format!("nats://127.0.0.1:{port}");
    let store = mongo.url();
    let out = tokio::task::spawn_blocking(move || {
        chatfleet(&["gateway", "--bus", &url, "--store", &store, "--listen", "127.0.0.1:0"])
    })
    .await
    .unwrap();
    assert_one_clear_line(&out, &["2.9.10", "too old", "2.11"]);
}

/// A `chatfleet` process killed on drop, should a test fail before it stops it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `chatfleet` as a new user first runs it: no arguments, nothing configured, in a directory of
/// its own. The listen address alone comes from `CHATFLEET_LISTEN`, the documented equivalent of
/// `--listen`: the default port 8080 may be taken on a test machine (by another test running at
/// the same time, or by anything else), and the command line must stay empty, which is the point.
#[tokio::test]
async fn with_no_arguments_chatfleet_keeps_its_store_in_the_working_directory_answers_and_serves_the_page() {
    llm::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let port = testkit::free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatfleet"));
    for (name, _) in std::env::vars() {
        if name.starts_with("CHATFLEET_") || name.starts_with("OPENAI_") {
            command.env_remove(name);
        }
    }
    let child = command
        .current_dir(dir.path())
        .env("CHATFLEET_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the binary starts");
    let mut chatfleet = Running(child);
    let stdout = chatfleet.0.stdout.take().unwrap();
    let printed = std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());
    let (http, base) = (reqwest::Client::new(), format!("http://127.0.0.1:{port}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(chatfleet.0.try_wait().unwrap().is_none(), "chatfleet stopped during start-up");
        assert!(std::time::Instant::now() < deadline, "chatfleet was not ready within 20 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let created: serde_json::Value =
        http.post(format!("{base}/v1/sessions")).send().await.unwrap().json().await.unwrap();
    let (id, token) = (created["session_id"].as_str().unwrap(), created["token"].as_str().unwrap());
    let text = "hello, is anyone there?";
    let streamed = http
        .post(format!("{base}/v1/sessions/{id}/messages"))
        .bearer_auth(token)
        .header("Accept", "text/event-stream")
        .json(&serde_json::json!({"text": text}))
        .send()
        .await
        .unwrap();
    let events = support::collect_events(streamed, std::time::Duration::from_secs(30)).await;
    let page = http.get(format!("{base}/")).send().await.unwrap();
    let page_type = page.headers()["content-type"].to_str().unwrap().to_owned();
    let page_text = page.text().await.unwrap();
    Command::new("kill").args(["-INT", &chatfleet.0.id().to_string()]).status().expect("kill runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = chatfleet.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "chatfleet did not stop within 20 s of Ctrl-C");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let printed = printed.join().unwrap().join("\n");

    let store = dir.path().canonicalize().unwrap().join(".chatfleet").join("dev.redb");
    assert!(store.is_file(), "the default store {} was created", store.display());
    assert!(printed.contains(&format!("conversations are kept in {}", store.display())), "{printed}");
    assert!(printed.contains("stand-in model"), "{printed}");
    let done = events.last().expect("some events");
    assert_eq!(done.event, "done", "{events:#?}");
    let reply = done.data["text"].as_str().unwrap();
    assert!(reply.starts_with(&support::echo_of(text)), "the stand-in model echoes: {reply}");
    assert_eq!(support::assembled_text(&events), reply);
    assert!(page_type.starts_with("text/html"), "{page_type}");
    assert!(page_text.contains("/v1/sessions"), "the chat page uses the API");
    assert!(exit.success(), "Ctrl-C ends chatfleet cleanly: {exit}");
}
