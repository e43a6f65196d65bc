//! Start-up as an operator sees it: the real binary, its help, and one clear line for every
//! setting that is wrong.

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
