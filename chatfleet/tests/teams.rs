//! Microsoft Teams end to end, with Microsoft's own Bot Framework validator
//! (`botframework-connector` from PyPI, in `tests/channels/teams_peer.py`) as the judge of every
//! token: the peer publishes OpenID metadata and a JWKS of local RSA keys, mints the tokens, and
//! each token's verdict by `JwtTokenValidation.authenticate_request` is checked before chatfleet
//! sees it. The same peer is the token endpoint and the Connector API the replies go to. On
//! `dev`, NATS and RabbitMQ.

#[macro_use]
mod support;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Backend, Options, TestApp, echo_of};

on_every_backend!(
    a_teams_message_with_a_valid_token_gets_a_typing_indicator_and_one_reply_with_the_bots_token,
    tokens_for_another_bot_expired_for_another_service_url_or_unendorsed_are_refused_and_never_answered,
    a_key_published_after_start_up_is_fetched_on_first_use_and_a_throttled_reply_is_posted_after_retry_after,
);

const APP_ID: &str = "6c3bf1e4-1b3a-4b8e-9a43-0f7d2f0c9b11";
const APP_PASSWORD: &str = "teams-test-password";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

fn python() -> PathBuf {
    support::test_python("botframework.connector")
}

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/channels/teams_peer.py")
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The Bot Framework's services, played by the peer.
struct BotFramework {
    child: Child,
    port: u16,
    http: reqwest::Client,
}

impl Drop for BotFramework {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BotFramework {
    async fn start() -> BotFramework {
        llm::install_crypto_provider();
        let port = testkit::free_port();
        let child = Command::new(python()).arg(peer_script()).args(["serve", &port.to_string()]).spawn().unwrap();
        let peer = BotFramework { child, port, http: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while peer.http.get(peer.url("/calls")).send().await.is_err() {
            assert!(Instant::now() < deadline, "the Bot Framework peer did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peer
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Where the Connector API of the activities lives.
    fn service_url(&self) -> String {
        self.url("/teams/")
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let response = self.http.post(self.url(path)).json(&body).send().await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.unwrap()
    }

    /// A token signed by the key `kid` with these claims.
    async fn mint(&self, kid: &str, claims: Value) -> String {
        self.post("/mint", json!({"kid": kid, "claims": claims})).await["token"].as_str().unwrap().to_owned()
    }

    /// Microsoft's verdict on the request: None if it accepts it, else why it refuses.
    async fn microsofts_verdict(&self, authorization: &str, activity: &Value) -> Option<String> {
        let verdict = self
            .post("/validate", json!({"authorization": authorization, "activity": activity, "app_id": APP_ID}))
            .await;
        if verdict["ok"] == true { None } else { Some(verdict["error"].as_str().unwrap_or("refused").to_owned()) }
    }

    async fn calls(&self) -> Value {
        self.http.get(self.url("/calls")).send().await.unwrap().json().await.unwrap()
    }

    async fn connector_calls(&self) -> Vec<Value> {
        self.calls().await["connector"].as_array().unwrap().clone()
    }

    /// Waits until `n` calls of the Connector API match `wanted`; returns those.
    async fn wait_for(&self, n: usize, within: Duration, wanted: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let calls: Vec<Value> = self.connector_calls().await.into_iter().filter(|c| wanted(c)).collect();
            if calls.len() >= n {
                return calls;
            }
            assert!(Instant::now() < deadline, "{n} Connector calls within {within:?}; seen {calls:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The claims of a token the Bot Framework sends to this bot.
fn claims(service_url: &str) -> Value {
    json!({
        "serviceurl": service_url,
        "nbf": now() - 5,
        "exp": now() + 3600,
        "iss": "https://api.botframework.com",
        "aud": APP_ID,
    })
}

fn with(mut value: Value, changes: Value) -> Value {
    value.as_object_mut().unwrap().extend(changes.as_object().unwrap().clone());
    value
}

fn unique(label: &str) -> String {
    format!("{label}-{:012x}", rand::random::<u64>() >> 16)
}

/// A message activity as Teams sends it in a personal chat.
fn message(service_url: &str, conversation: &str, id: &str, text: &str) -> Value {
    json!({
        "type": "message",
        "id": id,
        "timestamp": "2026-12-01T12:00:00.000Z",
        "channelId": "msteams",
        "serviceUrl": service_url,
        "from": {"id": "29:1user", "name": "Ada Lovelace", "aadObjectId": "0e6b7c2a-8f3e-4c55-9a55-3c8d1c2b6f10"},
        "conversation": {"conversationType": "personal", "tenantId": TENANT, "id": conversation},
        "recipient": {"id": "28:6c3bf1e4-1b3a-4b8e-9a43-0f7d2f0c9b11", "name": "chatfleet"},
        "textFormat": "plain",
        "locale": "en-GB",
        "text": text,
        "channelData": {"tenant": {"id": TENANT}},
    })
}

async fn spawn_with_teams(backend: Backend, peer: &BotFramework, dir: &tempfile::TempDir) -> TestApp {
    let path = dir.path().join("channels.toml");
    let text = format!(
        "[teams]\napp_id = \"{APP_ID}\"\napp_password = \"{APP_PASSWORD}\"\nopenid_metadata_url = \"{}\"\ntoken_url = \"{}\"\n\n[delivery]\nretry_schedule = [\"200ms\", \"300ms\", \"500ms\", \"500ms\", \"500ms\"]\n",
        peer.url("/v1/.well-known/openidconfiguration"),
        peer.url("/botframework.com/oauth2/v2.0/token"),
    );
    std::fs::write(&path, text).unwrap();
    TestApp::spawn_with(backend, Options { channels: Some(path), ..Options::default() }).await
}

async fn send(app: &TestApp, authorization: Option<&str>, activity: &Value) -> reqwest::Response {
    let mut request = app.http.post(app.url("/v1/channels/teams/messages")).json(activity);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    request.send().await.unwrap()
}

fn in_conversation(conversation: &str) -> impl Fn(&Value) -> bool {
    let conversation = conversation.to_owned();
    move |call: &Value| call["body"]["conversation"]["id"] == conversation.as_str()
}

async fn a_teams_message_with_a_valid_token_gets_a_typing_indicator_and_one_reply_with_the_bots_token(
    backend: Backend,
) {
    let peer = BotFramework::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_teams(backend, &peer, &dir).await;
    let conversation = format!("a:1{}", unique("conv"));
    let first = message(&peer.service_url(), &conversation, &unique("1700000000"), "what is the weather");
    let second = message(&peer.service_url(), &conversation, &unique("1700000001"), "and tomorrow");
    let token = format!("Bearer {}", peer.mint("key-teams", claims(&peer.service_url())).await);

    assert_eq!(peer.microsofts_verdict(&token, &first).await, None, "Microsoft's validator accepts the request");
    let started = Instant::now();
    let acked = send(&app, Some(&token), &first).await;
    let ack_time = started.elapsed();
    assert_eq!(acked.status(), 200);
    assert!(ack_time < Duration::from_secs(3), "acknowledged after {ack_time:?}");
    let is_reply = |c: &Value| c["body"]["type"] == "message";
    let replies = peer.wait_for(1, Duration::from_secs(20), |c| in_conversation(&conversation)(c) && is_reply(c)).await;
    // The Bot Framework redelivers an activity whose answer it missed: one reply all the same.
    let redelivered = send(&app, Some(&token), &first).await;
    assert_eq!(redelivered.status(), 200);
    assert_eq!(send(&app, Some(&token), &second).await.status(), 200);
    peer.wait_for(2, Duration::from_secs(20), |c| in_conversation(&conversation)(c) && is_reply(c)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let calls: Vec<Value> = peer.connector_calls().await.into_iter().filter(in_conversation(&conversation)).collect();
    let replies_now: Vec<&Value> = calls.iter().filter(|c| is_reply(c)).collect();
    assert_eq!(replies_now.len(), 2, "one reply per message, however often it is delivered: {calls:#?}");
    let reply = &replies[0];
    let encoded_conversation = conversation.replace(':', "%3A");
    assert_eq!(
        reply["path"],
        format!("/teams/v3/conversations/{encoded_conversation}/activities/{}", first["id"].as_str().unwrap())
    );
    assert_eq!(reply["status"], 200);
    assert_eq!(reply["token_known"], true, "carries the token the token endpoint issued: {reply}");
    assert_eq!(reply["schema_ok"], true, "botbuilder-schema reads it as an Activity: {reply}");
    let body = &reply["body"];
    assert_eq!(body["replyToId"], first["id"]);
    assert_eq!(body["from"]["id"], first["recipient"]["id"], "the bot speaks");
    assert_eq!(body["recipient"]["id"], first["from"]["id"]);
    assert!(body["text"].as_str().unwrap().starts_with(&echo_of("what is the weather")), "{body}");
    assert!(replies_now[1]["body"]["text"].as_str().unwrap().starts_with(&echo_of("and tomorrow")));
    let typing: Vec<&Value> = calls.iter().filter(|c| c["body"]["type"] == "typing").collect();
    assert!(!typing.is_empty(), "a typing indicator: {calls:#?}");
    assert_eq!(typing[0]["path"], format!("/teams/v3/conversations/{encoded_conversation}/activities"));
    assert_eq!(typing[0]["token_known"], true);
    // The client-credentials grant, asked once: the token is cached for the later calls.
    let token_requests = peer.calls().await["token_requests"].as_array().unwrap().clone();
    assert_eq!(token_requests.len(), 1, "{token_requests:#?}");
    let form = &token_requests[0]["form"];
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], APP_ID);
    assert_eq!(form["client_secret"], APP_PASSWORD);
    assert_eq!(form["scope"], "https://api.botframework.com/.default");
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(
        support::metric(&metrics, r#"chatfleet_gateway_channel_replies_delivered_total{channel="teams"}"#),
        Some(2.0),
        "{metrics}"
    );
    app.shutdown().await;
}

async fn tokens_for_another_bot_expired_for_another_service_url_or_unendorsed_are_refused_and_never_answered(
    backend: Backend,
) {
    let peer = BotFramework::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_teams(backend, &peer, &dir).await;
    let service_url = peer.service_url();
    let conversation = format!("a:1{}", unique("refused"));
    let activity = |label: &str| message(&service_url, &conversation, &unique(label), "let me in");
    let good_claims = claims(&service_url);
    let cases = [
        (
            "another bot",
            "key-teams",
            with(good_claims.clone(), json!({"aud": "00000000-0000-0000-0000-000000000001"})),
            activity("aud"),
            401,
        ),
        (
            "expired",
            "key-teams",
            with(good_claims.clone(), json!({"nbf": now() - 7200, "exp": now() - 3600})),
            activity("exp"),
            401,
        ),
        ("another service url", "key-teams", claims("https://smba.trafficmanager.net/amer/"), activity("url"), 401),
        ("a key not endorsed for msteams", "key-webchat", good_claims.clone(), activity("endorse"), 403),
    ];

    let mut statuses = Vec::new();
    for (what, kid, claims, activity, _) in &cases {
        let token = format!("Bearer {}", peer.mint(kid, claims.clone()).await);
        let verdict = peer.microsofts_verdict(&token, activity).await;
        assert!(verdict.is_some(), "Microsoft's validator refuses {what}");
        statuses.push(send(&app, Some(&token), activity).await.status().as_u16());
    }
    let unsigned = send(&app, None, &activity("none")).await.status().as_u16();
    let valid = format!("Bearer {}", peer.mint("key-teams", good_claims.clone()).await);
    let update = json!({
        "type": "conversationUpdate", "id": unique("update"), "channelId": "msteams", "serviceUrl": service_url,
        "conversation": {"id": conversation}, "recipient": {"id": "28:bot"}, "membersAdded": [{"id": "28:bot"}],
    });
    let own =
        with(activity("own"), json!({"from": {"id": "28:6c3bf1e4-1b3a-4b8e-9a43-0f7d2f0c9b11", "name": "chatfleet"}}));
    let ignored = [send(&app, Some(&valid), &update).await.status(), send(&app, Some(&valid), &own).await.status()];
    let real = with(activity("real"), json!({"text": "the real question"}));
    assert_eq!(peer.microsofts_verdict(&valid, &real).await, None);
    let answered = send(&app, Some(&valid), &real).await.status();

    let expected: Vec<u16> = cases.iter().map(|case| case.4).collect();
    assert_eq!(statuses, expected, "{:?}", cases.iter().map(|c| c.0).collect::<Vec<_>>());
    assert_eq!(unsigned, 401);
    assert_eq!(ignored.map(|s| s.as_u16()), [200, 200]);
    assert_eq!(answered, 200);
    peer.wait_for(1, Duration::from_secs(20), |c| in_conversation(&conversation)(c) && c["body"]["type"] == "message")
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replies: Vec<Value> = peer
        .connector_calls()
        .await
        .into_iter()
        .filter(|c| in_conversation(&conversation)(c) && c["body"]["type"] == "message")
        .collect();
    assert_eq!(replies.len(), 1, "only the real question is answered: {replies:#?}");
    assert_eq!(replies[0]["body"]["replyToId"], real["id"]);
    assert!(replies[0]["body"]["text"].as_str().unwrap().starts_with(&echo_of("the real question")));
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for (reason, n) in [
        ("wrong_audience", 1.0),
        ("expired_token", 1.0),
        ("service_url_mismatch", 1.0),
        ("not_endorsed", 1.0),
        ("missing_token", 1.0),
    ] {
        let series = format!(r#"chatfleet_gateway_channel_rejected_total{{channel="teams",reason="{reason}"}}"#);
        assert_eq!(support::metric(&metrics, &series), Some(n), "{series}: {metrics}");
    }
    app.shutdown().await;
}

async fn a_key_published_after_start_up_is_fetched_on_first_use_and_a_throttled_reply_is_posted_after_retry_after(
    backend: Backend,
) {
    let peer = BotFramework::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with_teams(backend, &peer, &dir).await;
    let service_url = peer.service_url();
    let conversation = format!("a:1{}", unique("rotated"));
    let before = message(&service_url, &conversation, &unique("before"), "first");
    let old_key = format!("Bearer {}", peer.mint("key-teams", claims(&service_url)).await);
    assert_eq!(send(&app, Some(&old_key), &before).await.status(), 200);
    peer.wait_for(1, Duration::from_secs(20), |c| in_conversation(&conversation)(c) && c["body"]["type"] == "message")
        .await;
    let fetches_before = peer.calls().await["jwks_fetches"].as_u64().unwrap();

    // The Bot Framework rotates its keys: a new one, first seen in a token.
    peer.post("/keys", json!({"kid": "key-rotated", "endorsements": ["msteams"]})).await;
    // (The gateway fetches the keys at most once a second.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    peer.post("/control", json!({"throttle": 1})).await;
    let after = message(&service_url, &conversation, &unique("after"), "second");
    let new_key = format!("Bearer {}", peer.mint("key-rotated", claims(&service_url)).await);
    assert_eq!(peer.microsofts_verdict(&new_key, &after).await, None);
    let fetches_validated = peer.calls().await["jwks_fetches"].as_u64().unwrap();
    let accepted = send(&app, Some(&new_key), &after).await.status();
    let fetches_after = peer.calls().await["jwks_fetches"].as_u64().unwrap() - fetches_validated;

    assert_eq!(accepted, 200);
    assert_eq!(fetches_after, 1, "the keys were fetched again once, for the unknown kid");
    assert!(fetches_before >= 1);
    let is_second = |c: &Value| c["body"]["replyToId"] == after["id"];
    peer.wait_for(2, Duration::from_secs(20), is_second).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attempts = peer.connector_calls().await.into_iter().filter(|c| is_second(c)).collect::<Vec<_>>();
    let statuses: Vec<&Value> = attempts.iter().map(|c| &c["status"]).collect();
    assert_eq!(statuses, [429, 200], "posted once after the 429: {attempts:#?}");
    let waited = attempts[1]["at"].as_f64().unwrap() - attempts[0]["at"].as_f64().unwrap();
    assert!(waited >= 0.95, "Retry-After: 1 honoured, waited {waited:.2} s");
    app.shutdown().await;
}
