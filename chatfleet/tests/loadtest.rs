//! The load generator against a real fleet: a conversation load on NATS and MongoDB passes
//! every check the generator makes (isolation, stream consistency, complete ordered histories).

mod support;

use std::time::Duration;

use chatfleet_loadtest::plan::{Scenario, Target, TargetKind, new_run_id};
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
