//! API keys with quotas and rate limits (README, "API keys and limits"): each limit refuses
//! the excess with `429`, `Retry-After` and a code naming the limit, across every gateway of
//! a fleet, loses nothing accepted before, and shows in the metrics; keys are added and
//! revoked by editing the keys file, without a restart.

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::{Backend, Options, Session, TestApp};

on_every_backend!(
    messages_past_a_keys_per_minute_limit_are_refused_fleet_wide_and_every_accepted_one_is_answered,
    streams_past_a_users_open_stream_limit_are_refused_until_one_closes,
    sessions_past_a_keys_limit_are_refused_until_one_is_deleted,
    a_user_who_used_the_days_model_tokens_is_refused_and_other_users_are_not,
    a_sessions_own_message_rate_is_limited,
    a_key_removed_from_the_keys_file_is_revoked_and_a_new_one_works_without_a_restart,
);

const KEY: &str = "ck_live_quota_test_key";

fn sha256_hex(value: &str) -> String {
    Sha256::digest(value.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A keys file holding one key, `name` with value `value`, and `limits` (TOML lines).
fn key_entry(name: &str, value: &str, limits: &str) -> String {
    format!("[[key]]\nname = \"{name}\"\nsha256 = \"{}\"\n{limits}\n", sha256_hex(value))
}

struct KeysFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl KeysFile {
    fn new(content: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.toml");
        std::fs::write(&path, content).unwrap();
        Self { _dir: dir, path }
    }

    fn rewrite(&self, content: &str) {
        // Written aside and renamed into place, as a ConfigMap update does: never half a file.
        let aside = self.path.with_extension("new");
        std::fs::write(&aside, content).unwrap();
        std::fs::rename(&aside, &self.path).unwrap();
    }
}

async fn fleet(backend: Backend, keys: &Path) -> TestApp {
    TestApp::spawn_with(backend, Options { api_keys_file: Some(keys.to_path_buf()), ..Options::default() }).await
}

async fn create_session(app: &TestApp, base: &str, key: &str, user: Option<&str>) -> reqwest::Response {
    let body = match user {
        Some(user) => json!({"user": user}),
        None => json!({}),
    };
    app.http.post(format!("{base}/v1/sessions")).bearer_auth(key).json(&body).send().await.unwrap()
}

async fn session(app: &TestApp, base: &str, key: &str, user: Option<&str>) -> Session {
    let r = create_session(app, base, key, user).await;
    assert_eq!(r.status(), 201, "creating a session");
    let body: Value = r.json().await.unwrap();
    Session { id: body["session_id"].as_str().unwrap().to_owned(), token: body["token"].as_str().unwrap().to_owned() }
}

async fn post_message(app: &TestApp, base: &str, session: &Session, text: &str) -> reqwest::Response {
    app.http
        .post(format!("{base}/v1/sessions/{}/messages", session.id))
        .bearer_auth(&session.token)
        .json(&json!({"text": text}))
        .send()
        .await
        .unwrap()
}

async fn open_events(app: &TestApp, base: &str, session: &Session) -> reqwest::Response {
    app.http.get(format!("{base}/v1/sessions/{}/events", session.id)).bearer_auth(&session.token).send().await.unwrap()
}

/// The status, error code and `Retry-After` of a refusal.
async fn refusal(response: reqwest::Response) -> (u16, String, Option<u64>) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse::<u64>().expect("Retry-After in seconds"));
    let body: Value = response.json().await.unwrap();
    (status, body["error"]["code"].as_str().unwrap_or_default().to_owned(), retry_after)
}

/// Rate limits count fixed UTC minutes: a test that sends a minute's worth starts early in a
/// minute, so that all of it lands in one.
async fn early_in_a_minute() {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() % 60_000;
    if millis > 40_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - millis as u64 + 200)).await;
    }
}

/// The sum of a counter's samples with these labels in a gateway's `/metrics`.
async fn metric(app: &TestApp, base: &str, name: &str, labels: &[&str]) -> f64 {
    let text = app.http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn messages_past_a_keys_per_minute_limit_are_refused_fleet_wide_and_every_accepted_one_is_answered(
    backend: Backend,
) {
    const LIMIT: usize = 20;
    let keys = KeysFile::new(&key_entry("acme", KEY, &format!("[key.limits]\nmessages_per_minute = {LIMIT}")));
    let mut app = fleet(backend, &keys.path).await;
    // On a fleet, through two gateways: the limit is the key's, fleet-wide.
    let second = if backend == Backend::Dev { app.base.clone() } else { app.add_gateway().await };
    let bases = [app.base.clone(), second.clone()];
    let mut sessions = Vec::new();
    for i in 0..4 {
        sessions.push(session(&app, &bases[i % 2], KEY, Some(&format!("user-{i}"))).await);
    }
    early_in_a_minute().await;

    // Twice the limit at once, half through each gateway.
    let sends = (0..2 * LIMIT).map(|i| {
        let (app, base, session) = (&app, &bases[i % 2], &sessions[i % sessions.len()]);
        async move { post_message(app, base, session, &format!("message {i}")).await }
    });
    let responses = futures::future::join_all(sends).await;

    let mut accepted = vec![0_usize; sessions.len()];
    let mut refused = Vec::new();
    for (i, response) in responses.into_iter().enumerate() {
        match response.status().as_u16() {
            202 => accepted[i % sessions.len()] += 1,
            _ => refused.push(refusal(response).await),
        }
    }
    assert_eq!(
        accepted.iter().sum::<usize>(),
        LIMIT,
        "exactly the limit is accepted across both gateways: {refused:?}"
    );
    assert_eq!(refused.len(), LIMIT);
    for (status, code, retry_after) in &refused {
        assert_eq!((*status, code.as_str()), (429, "messages_per_minute_exceeded"));
        assert!(retry_after.is_some_and(|s| (1..=60).contains(&s)), "Retry-After {retry_after:?}");
    }
    // Nothing accepted is lost and nothing refused slips in: each session holds exactly its
    // accepted messages, each answered once.
    for (session, accepted) in sessions.iter().zip(accepted) {
        app.wait_for_replies(session, accepted, Duration::from_secs(30)).await;
        // A moment more, for anything that should not be there to show.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let history = app.history(session).await;
        let users = history.iter().filter(|m| m["role"] == "user").count();
        let replies = history.iter().filter(|m| m["role"] == "assistant").count();
        assert_eq!((users, replies), (accepted, accepted), "session {}: {history:#?}", session.id);
    }
    // The test's gateways run in one process and share its metrics registry: one `/metrics`
    // shows every refusal of the fleet.
    let counted =
        metric(&app, &bases[0], "chatfleet_gateway_limits_exceeded_total", &["messages_per_minute_exceeded"]).await;
    assert_eq!(counted as usize, LIMIT, "the refusals are counted in the metrics");
}

async fn streams_past_a_users_open_stream_limit_are_refused_until_one_closes(backend: Backend) {
    let keys = KeysFile::new(&key_entry("acme", KEY, "[key.per_user]\nopen_streams = 2"));
    let mut app = fleet(backend, &keys.path).await;
    // On a fleet the streams are spread over two gateways; the limit is the user's, fleet-wide.
    let other = if backend == Backend::Dev { app.base.clone() } else { app.add_gateway().await };
    let base = app.base.clone();
    let first = session(&app, &base, KEY, Some("alice")).await;
    let second = session(&app, &base, KEY, Some("alice")).await;
    let someone_else = session(&app, &base, KEY, Some("bob")).await;

    let stream_1 = open_events(&app, &base, &first).await;
    let stream_2 = open_events(&app, &other, &second).await;
    let third = open_events(&app, &base, &first).await;
    let bobs = open_events(&app, &other, &someone_else).await;

    assert_eq!(stream_1.status(), 200);
    assert_eq!(stream_2.status(), 200);
    let (status, code, retry_after) = refusal(third).await;
    assert_eq!((status, code.as_str()), (429, "open_streams_exceeded"));
    assert!(retry_after.is_some());
    assert_eq!(bobs.status(), 200, "another user of the key has slots of their own");

    drop(stream_2);
    let mut reopened = None;
    for _ in 0..50 {
        let attempt = open_events(&app, &base, &first).await;
        if attempt.status() == 200 {
            reopened = Some(attempt);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reopened.is_some(), "a closed stream gives its slot back within 5 s");
    drop(stream_1);
}

async fn sessions_past_a_keys_limit_are_refused_until_one_is_deleted(backend: Backend) {
    let keys = KeysFile::new(&key_entry("acme", KEY, "[key.limits]\nsessions = 2"));
    let app = fleet(backend, &keys.path).await;
    let base = app.base.clone();
    let kept = session(&app, &base, KEY, None).await;
    let deleted = session(&app, &base, KEY, Some("u")).await;

    let (status, code, _) = refusal(create_session(&app, &base, KEY, None).await).await;
    assert_eq!((status, code.as_str()), (429, "sessions_exceeded"));

    let r =
        app.http.delete(format!("{base}/v1/sessions/{}", deleted.id)).bearer_auth(&deleted.token).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(create_session(&app, &base, KEY, None).await.status(), 201, "a deleted session frees its place");
    assert_eq!(post_message(&app, &base, &kept, "still here").await.status(), 202);
}

async fn a_user_who_used_the_days_model_tokens_is_refused_and_other_users_are_not(backend: Backend) {
    // Any reply takes more than one token.
    let keys = KeysFile::new(&key_entry("acme", KEY, "[key.per_user]\ntokens_per_day = 1"));
    let app = fleet(backend, &keys.path).await;
    let base = app.base.clone();
    let alice = session(&app, &base, KEY, Some("alice")).await;
    let bob = session(&app, &base, KEY, Some("bob")).await;

    let events = app.send_streaming(&alice, json!({"text": "spend my tokens"})).await;
    assert_eq!(events.last().unwrap().event, "done", "the first reply is within the day's tokens: {events:#?}");

    let (status, code, retry_after) = refusal(post_message(&app, &base, &alice, "and more").await).await;
    assert_eq!((status, code.as_str()), (429, "tokens_per_day_exceeded"));
    assert!(retry_after.is_some_and(|s| (1..=86_400).contains(&s)), "Retry-After until midnight UTC: {retry_after:?}");
    assert_eq!(post_message(&app, &base, &bob, "my own budget").await.status(), 202);
}

async fn a_sessions_own_message_rate_is_limited(backend: Backend) {
    let keys = KeysFile::new(&key_entry("acme", KEY, "session_messages_per_minute = 3"));
    let app = fleet(backend, &keys.path).await;
    let base = app.base.clone();
    let busy = session(&app, &base, KEY, None).await;
    let calm = session(&app, &base, KEY, None).await;
    early_in_a_minute().await;

    for i in 0..3 {
        assert_eq!(post_message(&app, &base, &busy, &format!("m{i}")).await.status(), 202);
    }
    let (status, code, _) = refusal(post_message(&app, &base, &busy, "one too many").await).await;

    assert_eq!((status, code.as_str()), (429, "session_messages_per_minute_exceeded"));
    assert_eq!(post_message(&app, &base, &calm, "hello").await.status(), 202, "other sessions are not slowed");
    let history = app.wait_for_replies(&busy, 3, Duration::from_secs(30)).await;
    let texts: Vec<&str> =
        history.iter().filter(|m| m["role"] == "user").map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["m0", "m1", "m2"], "the refused message left no trace");
}

async fn a_key_removed_from_the_keys_file_is_revoked_and_a_new_one_works_without_a_restart(backend: Backend) {
    let keys = KeysFile::new(&key_entry("old", "ck_old_value", ""));
    let app = fleet(backend, &keys.path).await;
    let base = app.base.clone();
    let old_session = session(&app, &base, "ck_old_value", None).await;
    assert_eq!(create_session(&app, &base, "ck_new_value", None).await.status(), 401);

    keys.rewrite(&key_entry("new", "ck_new_value", ""));
    let mut created = None;
    for _ in 0..50 {
        let attempt = create_session(&app, &base, "ck_new_value", None).await;
        if attempt.status() == 201 {
            created = Some(attempt);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert!(created.is_some(), "the new key works within 5 s of the change");
    assert_eq!(create_session(&app, &base, "ck_old_value", None).await.status(), 401);
    let (status, code, _) = refusal(post_message(&app, &base, &old_session, "hello?").await).await;
    assert_eq!((status, code.as_str()), (401, "api_key_revoked"), "the revoked key's sessions are closed too");
}
