//! Runs against the mock OpenAI-compatible model, served in-process on a free port: every
//! scenario, the isolation proof, errors by kind, and the files a run writes.

use std::net::SocketAddr;
use std::time::Duration;

use chatfleet_loadtest::plan::{Scenario, Target, TargetKind};
use chatfleet_loadtest::report::Outcome;
use chatfleet_loadtest::{RunConfig, chart, run};
use llm::mock_reply::MockSettings;
use llm::mock_server::{MockServerConfig, serve};
use tokio::sync::oneshot;

/// A mock model on a free port, shut down when dropped.
struct MockModel {
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn mock_model() -> MockModel {
    let listener = llm::mock_server::listen(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = MockSettings {
        first_token_delay: Duration::from_millis(20),
        token_delay: Duration::from_millis(2),
        reply_tokens: 16,
        echo_chars: 48,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let config = MockServerConfig { settings, model: "mock".into() };
    tokio::spawn(serve(listener, config, async move {
        let _ = stopped.await;
    }));
    MockModel { url: format!("http://{addr}/v1"), _stop: stop }
}

fn config(url: &str, scenario: Scenario) -> RunConfig {
    RunConfig {
        target: Target { kind: TargetKind::Openai, url: url.to_owned(), api_key: None, model: "mock".into() },
        scenario,
        run_id: "t0".into(),
        words: "hello fleet".into(),
        echo_chars: 48,
        timeout: Duration::from_secs(20),
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_users_gets_200_replies_with_no_violations() {
    let model = mock_model().await;

    let report = run(&config(&model.url, Scenario::Burst { users: 200 }), std::future::pending()).await.unwrap();

    assert_eq!(report.counts.answered, 200, "{}", report.summary_table());
    assert_eq!(report.counts.failed, 0, "{:?}", report.errors);
    assert_eq!(report.isolation.total(), 0);
    assert_eq!(report.latency.first_token.count, 200);
    assert_eq!(report.counts.tokens, 200 * 16);
    assert!(report.latency.first_token.p50_ms >= 20.0, "{:?}", report.latency.first_token);
    assert!(report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_starts_each_user_at_its_scheduled_offset() {
    let model = mock_model().await;
    let scenario = Scenario::Ramp { rate: 40.0, duration: Duration::from_millis(500) };

    let report = run(&config(&model.url, scenario), std::future::pending()).await.unwrap();

    let offsets: Vec<Duration> = report.records.iter().map(|record| record.scheduled).collect();
    let expected: Vec<Duration> = (0..20).map(|i| Duration::from_secs_f64(f64::from(i) / 40.0)).collect();
    assert_eq!(offsets, expected);
    assert_eq!(report.counts.answered, 20, "{}", report.summary_table());
    assert!(report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_sends_every_turn_with_the_earlier_ones_as_context() {
    let model = mock_model().await;
    let scenario = Scenario::Conversation { users: 5, turns: 3, think: Duration::from_millis(10) };

    let report = run(&config(&model.url, scenario), std::future::pending()).await.unwrap();

    assert_eq!(report.counts.answered, 15, "{}", report.summary_table());
    assert_eq!(report.isolation.total(), 0);
    assert!(!report.history.applies, "the OpenAI target keeps no history to check");
    let turns_of_user_0: Vec<u32> = report.records.iter().filter(|r| r.user == 0).map(|r| r.turn).collect();
    assert_eq!(turns_of_user_0, vec![0, 1, 2]);
    // A later turn is due after the earlier reply and the think time, never at the start.
    assert!(report.records.iter().filter(|r| r.turn > 0).all(|r| r.scheduled >= Duration::from_millis(40)));
    assert!(report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_are_counted_by_status_and_fail_the_run() {
    let model = mock_model().await;
    let mut config = config(&model.url, Scenario::Burst { users: 5 });
    config.words = "[mock:status=500,times=100]".into();

    let report = run(&config, std::future::pending()).await.unwrap();

    assert_eq!(report.counts.failed, 5);
    assert_eq!(report.errors.get("http 500 server_error"), Some(&5), "{:?}", report.errors);
    assert!(!report.passed);
    assert!(report.summary_table().contains("result                FAIL"), "{}", report.summary_table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_slower_than_the_timeout_counts_as_a_timeout() {
    let model = mock_model().await;
    let mut config = config(&model.url, Scenario::Burst { users: 3 });
    config.words = "[mock:stall=5000,times=100]".into();
    config.timeout = Duration::from_millis(300);

    let report = run(&config, std::future::pending()).await.unwrap();

    assert_eq!(report.errors.get("timeout"), Some(&3), "{:?}", report.errors);
    assert!(!report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_short_counts_as_an_error() {
    let model = mock_model().await;
    let mut config = config(&model.url, Scenario::Burst { users: 2 });
    config.words = "[mock:cut=3,times=100]".into();

    let report = run(&config, std::future::pending()).await.unwrap();

    assert_eq!(report.counts.failed, 2, "{:?}", report.errors);
    assert!(!report.passed);
}

#[tokio::test]
async fn an_unreachable_target_is_one_clear_error_before_any_load() {
    // A port that was just free and has nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/v1");

    let error = run(&config(&url, Scenario::Burst { users: 1 }), std::future::pending()).await.unwrap_err();

    let message = format!("{error:#}");
    assert!(message.starts_with(&format!("cannot reach the OpenAI endpoint at {url}: ")), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_reports_what_it_measured_and_fails() {
    let model = mock_model().await;
    let scenario = Scenario::Ramp { rate: 10.0, duration: Duration::from_secs(60) };

    let report = run(&config(&model.url, scenario), tokio::time::sleep(Duration::from_millis(350))).await.unwrap();

    assert!(report.interrupted);
    assert!(report.counts.answered >= 1, "{}", report.summary_table());
    assert_eq!(report.counts.not_sent, 600 - report.counts.answered - report.counts.failed);
    assert!(!report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_report_and_the_svg_chart_are_written() {
    let model = mock_model().await;
    let scenario = Scenario::Ramp { rate: 50.0, duration: Duration::from_millis(300) };
    let report = run(&config(&model.url, scenario), std::future::pending()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let svg_path = dir.path().join("chart.svg");

    chart::write_svg(&report, &svg_path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();

    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 3, "one curve per latency");
    assert!(svg.contains("Latency over the run"), "a ramp also gets the over-time panel");
    assert_eq!(json["scenario"]["kind"], "ramp");
    assert_eq!(json["counts"]["answered"], 15);
    assert_eq!(json["isolation"]["violations"], 0);
    assert_eq!(json["records"].as_array().unwrap().len(), 15);
    assert_eq!(json["records"][1]["scheduled_s"], 0.02);
    assert!(json["latency_ms"]["first_token"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(matches!(report.records[0].outcome, Outcome::Answered { .. }));
}
