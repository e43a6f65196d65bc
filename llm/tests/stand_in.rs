//! The built-in stand-in model: it must answer exactly as the mock server does.

mod common;

use std::time::Duration;

use chatfleet_llm::mock_reply::MockSettings;
use chatfleet_llm::stand_in::StandInModel;
use chatfleet_llm::{ChatChunk, ChatModel, LlmError};
use common::{MockServer, drain, quick_settings, user_request};
use schemas::FinishReason;

#[tokio::test]
async fn the_stand_in_gives_the_same_tokens_and_usage_as_the_mock_server() {
    let server = MockServer::start(quick_settings()).await;
    let over_http = server.patient_model();
    let stand_in = StandInModel::new(quick_settings());
    let text = "Compare   these two\tmodels, token by token, please.";

    let from_server = drain(over_http.stream(user_request(text)).await.unwrap()).await;
    let from_stand_in = drain(stand_in.stream(user_request(text)).await.unwrap()).await;

    assert_eq!(from_stand_in.deltas, from_server.deltas);
    assert!(matches!(
        from_stand_in.end,
        Some(Ok(ChatChunk::Finished { finish_reason: FinishReason::Stop, usage: Some(_) }))
    ));
    assert_eq!(from_stand_in.end, from_server.end);
}

#[tokio::test]
async fn the_stand_in_obeys_status_directives_like_the_server() {
    let stand_in = StandInModel::new(quick_settings());
    let text = "[mock:status=503,times=1] hello";

    let first = stand_in.stream(user_request(text)).await.err();
    let refused = stand_in.stream(user_request("[mock:status=401] hi")).await.err();
    let second = drain(stand_in.stream(user_request(text)).await.unwrap()).await;

    assert!(matches!(first, Some(LlmError::Transient { retry_after: Some(_), .. })), "{first:?}");
    assert!(matches!(refused, Some(LlmError::Permanent { code, .. }) if code == "model_unauthorized"));
    assert!(matches!(second.end, Some(Ok(ChatChunk::Finished { .. }))));
}

#[tokio::test]
async fn the_stand_in_cuts_a_stream_after_the_given_number_of_tokens() {
    let stand_in = StandInModel::new(quick_settings());
    let text = "[mock:cut=2,times=1] hello";

    let cut = drain(stand_in.stream(user_request(text)).await.unwrap()).await;
    let retry = drain(stand_in.stream(user_request(text)).await.unwrap()).await;

    assert_eq!(cut.deltas.len(), 2);
    assert!(matches!(cut.end, Some(Err(LlmError::Transient { .. }))));
    assert_eq!(cut.deltas, retry.deltas[..2]);
    assert!(matches!(retry.end, Some(Ok(ChatChunk::Finished { .. }))));
}

#[tokio::test]
async fn the_stand_in_waits_the_first_token_delay_and_any_stall() {
    let settings = MockSettings { first_token_delay: Duration::from_millis(40), ..quick_settings() };
    let stand_in = StandInModel::new(settings);

    let started = tokio::time::Instant::now();
    let mut plain = stand_in.stream(user_request("plain")).await.unwrap();
    futures::StreamExt::next(&mut plain).await;
    let plain_wait = started.elapsed();
    let started = tokio::time::Instant::now();
    let mut stalled = stand_in.stream(user_request("[mock:stall=60] stalled")).await.unwrap();
    futures::StreamExt::next(&mut stalled).await;
    let stalled_wait = started.elapsed();

    assert!(plain_wait >= Duration::from_millis(40), "{plain_wait:?}");
    assert!(stalled_wait >= Duration::from_millis(100), "{stalled_wait:?}");
}

#[test]
fn the_stand_in_says_it_is_not_a_real_model() {
    let stand_in = StandInModel::default();

    let description = stand_in.describe();

    assert!(description.contains("stand-in"), "{description}");
}
