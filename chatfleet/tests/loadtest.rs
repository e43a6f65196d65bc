//! The load generator against a real fleet: a conversation load on NATS and MongoDB passes
//! every check the generator makes (isolation, stream consistency, complete ordered histories),
//! and the webhooks scenario gets every signed reply delivered, verified, once.

mod support;

use std::time::Duration;

use chatfleet_loadtest::plan::{Scenario, Target, TargetKind, new_run_id};
use chatfleet_loadtest::webhooks::WebhookConfig;
use chatfleet_loadtest::{RunConfig, run};
use support::{Backend, Options, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_load_on_the_fleet_passes_every_check() {
    let app = TestApp::spawn_with(Backend::NatsMongo, Options { workers: 2, ..Options::default() }).await;
    let config = RunConfig {
        target: Target { kind: TargetKind::Gateway, url: app.base.clone(), api_key: None, model: "mock".into() },
        scenario: Scenario::Conversation { users: 60, turns: 3, think: Duration::from_millis(20) },
        run_id: new_run_id(),
        words: chatfleet_loadtest::runner::DEFAULT_WORDS.into(),
        echo_chars: 48,
        timeout: Duration::from_secs(60),
        progress: false,
    };

    let report = run(&config, std::future::pending()).await.expect("the run starts");

    assert_eq!(report.counts.answered, 180, "{:?}", report.counts);
    assert!(report.passed, "the load generator found problems: {:?}", report.counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhooks_scenario_gets_every_signed_reply_delivered_once_and_reports_its_latency() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let receiver = testkit::free_port();
    let dir = tempfile::tempdir().unwrap();
    let channels = dir.path().join("channels.toml");
    let file = format!("[webhooks.loadtest]\nsecret = \"{secret}\"\nurl = \"http://127.0.0.1:{receiver}/replies\"\n");
    std::fs::write(&channels, file).unwrap();
    let app = TestApp::spawn_with(Backend::NatsMongo, Options { channels: Some(channels), ..Options::default() }).await;
    let config = WebhookConfig {
        url: app.base.clone(),
        integration: "loadtest".into(),
        secret: secret.into(),
        listen: format!("127.0.0.1:{receiver}").parse().unwrap(),
        conversations: 20,
        run_id: new_run_id(),
        words: chatfleet_loadtest::runner::DEFAULT_WORDS.into(),
        timeout: Duration::from_secs(30),
    };

    let report = chatfleet_loadtest::webhooks::run(&config, std::future::pending()).await.expect("the run starts");

    print!("{}", report.summary_table());
    let c = &report.counts;
    assert_eq!((c.accepted, c.delivered, c.missing, c.duplicates, c.bad_signatures), (20, 20, 0, 0, 0), "{c:?}");
    assert_eq!(report.delivery_latency.count, 20);
    assert!(report.delivery_latency.p50_ms > 0.0 && report.delivery_latency.p99_ms >= report.delivery_latency.p50_ms);
    assert!(report.passed, "{:?}", report.problems);
}
