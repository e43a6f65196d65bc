//! What happens when the broker goes away or delivers twice.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use bus::Bus;
use serde_json::json;
use support::{Backend, Broker, Options, TestApp, read_until_terminal_of};

on_every_broker!(
    the_gateway_answers_503_within_two_seconds_while_the_bus_is_down_and_recovers,
    a_message_delivered_twice_by_the_bus_is_answered_once,
);

async fn the_gateway_answers_503_within_two_seconds_while_the_bus_is_down_and_recovers(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, Options { private_broker: true, ..Options::default() }).await;
    let session = app.create_session().await;
    app.send_streaming(&session, json!({"text": "before the outage"})).await;

    app.broker_mut().stop().await;
    let started = Instant::now();
    let during =
        app.post_message(&session, json!({"text": "during the outage", "client_message_id": "outage-1"})).await;
    let took = started.elapsed();
    let streaming = app
        .http
        .post(app.url(&format!("/v1/sessions/{}/messages", session.id)))
        .bearer_auth(&session.token)
        .header("Accept", "text/event-stream")
        .json(&json!({"text": "streaming during the outage"}))
        .send()
        .await
        .unwrap();
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();

    assert_eq!(during.status(), 503);
    assert!(took < Duration::from_secs(2), "503 took {took:?}");
    let body: serde_json::Value = during.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bus_unavailable");
    assert_eq!(streaming.status(), 503);
    assert_eq!(ready.status(), 503);

    app.broker_mut().restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.post_message(&session, json!({"text": "during the outage", "client_message_id": "outage-1"})).await;
        if r.status() == 202 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(Instant::now() < deadline, "the gateway did not recover within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let history = app.wait_for_replies(&session, 2, Duration::from_secs(30)).await;
    assert_eq!(app.http.get(app.url("/readyz")).send().await.unwrap().status(), 200);
    let texts: Vec<&str> =
        history.iter().filter(|m| m["role"] == "user").map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["before the outage", "during the outage"], "the retried message is answered exactly once");
}

/// Puts the same envelope on the bus twice, past any deduplication, as a redelivery would.
async fn publish_twice(app: &TestApp, envelope: &schemas::UserMessage) {
    let partitions = schemas::PartitionCount::new(app.options.partitions).unwrap();
    match app.broker.as_ref().unwrap() {
        Broker::Nats(server) => {
            // Without a deduplication id.
            let client = async_nats::connect(server.url()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let partition = partitions.of(&envelope.session_id);
            let subject = schemas::subjects::Names::default().input_subject(partition, &envelope.session_id);
            let payload = serde_json::to_vec(envelope).unwrap();
            for _ in 0..2 {
                js.publish(subject.clone(), payload.clone().into()).await.unwrap().await.unwrap();
            }
        }
        broker => {
            // RabbitMQ keeps no deduplication window: both copies go in.
            let bus = bus::AmqpBus::connect(bus::AmqpSettings::new(broker.url(), partitions)).await.unwrap();
            for _ in 0..2 {
                bus.enqueue(envelope).await.unwrap();
            }
        }
    }
}

async fn a_message_delivered_twice_by_the_bus_is_answered_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = app.create_session().await;
    let listener = app.open_events(&session).await;

    let session_id = schemas::SessionId::parse(&session.id).unwrap();
    let envelope = schemas::UserMessage {
        v: schemas::ENVELOPE_VERSION,
        session_id,
        message_id: schemas::MessageId::parse("m_twice").unwrap(),
        text: "say it once".into(),
        accepted_at: time::OffsetDateTime::now_utc(),
        double_texting: None,
        channel: None,
        cancel: None,
    };
    publish_twice(&app, &envelope).await;
    // A later message of the same session is handled after both copies.
    let after: serde_json::Value =
        app.post_message(&session, json!({"text": "and then this"})).await.json().await.unwrap();
    let events = read_until_terminal_of(listener, after["message_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    let history = app.history(&session).await;

    // A copy that arrives while the first is being answered is settled silently; one that
    // arrives after it announces the stored outcome again, with the same event id. Either
    // way a client that keys events by id sees one `done` per message.
    let mut dones: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.event == "done")
        .map(|e| (e.data["message_id"].as_str().unwrap().to_owned(), e.id.clone()))
        .collect();
    assert!((2..=3).contains(&dones.len()), "{dones:?}");
    dones.dedup();
    let done_messages: Vec<&str> = dones.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(done_messages, ["m_twice", after["message_id"].as_str().unwrap()], "one done per message, in order");
    assert_eq!(history.iter().filter(|m| m["reply_to"] == "m_twice").count(), 1);
    assert_eq!(history.iter().filter(|m| m["message_id"] == "m_twice").count(), 1);
    assert_eq!(history.len(), 4);
}
