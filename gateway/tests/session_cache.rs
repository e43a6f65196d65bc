//! The gateway's session cache seen through the HTTP API: a gateway that deletes a session
//! answers 404 for it at once, and a deletion it did not make is seen once the cache's
//! time-to-live has passed (the documented staleness bound), never later.

use std::sync::Arc;
use std::time::Duration;

use bus::MemoryBus;
use chatfleet_gateway::{Gateway, GatewayConfig};
use schemas::{PartitionCount, SessionId};
use serde_json::{Value, json};
use store::{EmbeddedStore, Store};
use tokio_util::sync::CancellationToken;

/// A gateway on a free port, over a memory bus and an embedded store of its own.
struct TestGateway {
    base: String,
    http: reqwest::Client,
    store: Arc<EmbeddedStore>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

/// A session as the API returned it.
struct Session {
    id: String,
    token: String,
}

impl TestGateway {
    async fn spawn(session_cache_ttl: Duration) -> TestGateway {
        // reqwest is built without a default TLS provider; plain HTTP needs one all the same.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let bus = Arc::new(MemoryBus::new(PartitionCount::new(4).unwrap()));
        let config = GatewayConfig { session_cache_ttl, ..GatewayConfig::default() };
        let gateway = Gateway::build(bus, store.clone(), config, None).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(gateway.serve(listener, stop.clone().cancelled_owned()));
        TestGateway { base, http: reqwest::Client::new(), store, stop, _dir: dir }
    }

    async fn create_session(&self) -> Session {
        let r = self.http.post(format!("{}/v1/sessions", self.base)).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        Session { id: body["session_id"].as_str().unwrap().into(), token: body["token"].as_str().unwrap().into() }
    }

    /// The status of posting a message to the session.
    async fn post_message(&self, session: &Session) -> u16 {
        let url = format!("{}/v1/sessions/{}/messages", self.base, session.id);
        let r = self.http.post(url).bearer_auth(&session.token).json(&json!({"text": "hello"})).send().await.unwrap();
        r.status().as_u16()
    }

    /// The status of reading the session's history.
    async fn history(&self, session: &Session) -> u16 {
        let url = format!("{}/v1/sessions/{}/messages", self.base, session.id);
        self.http.get(url).bearer_auth(&session.token).send().await.unwrap().status().as_u16()
    }

    async fn delete_session(&self, session: &Session) -> u16 {
        let url = format!("{}/v1/sessions/{}", self.base, session.id);
        self.http.delete(url).bearer_auth(&session.token).send().await.unwrap().status().as_u16()
    }

    /// Deletes the session in the store, as another gateway replica would: this gateway is not told.
    async fn delete_behind_its_back(&self, session: &Session) {
        assert!(self.store.delete_session(&SessionId::parse(session.id.clone()).unwrap()).await.unwrap());
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn a_session_deleted_through_the_gateway_is_gone_at_once() {
    let gateway = TestGateway::spawn(Duration::from_secs(60)).await;
    let session = gateway.create_session().await;
    let accepted = gateway.post_message(&session).await;

    let deleted = gateway.delete_session(&session).await;
    let post = gateway.post_message(&session).await;
    let history = gateway.history(&session).await;
    let deleted_again = gateway.delete_session(&session).await;

    assert_eq!(accepted, 202);
    assert_eq!(deleted, 204);
    assert_eq!(post, 404);
    assert_eq!(history, 404);
    assert_eq!(deleted_again, 404);
}

#[tokio::test]
async fn a_deletion_behind_the_gateways_back_is_seen_once_the_ttl_has_passed() {
    let gateway = TestGateway::spawn(Duration::from_millis(50)).await;
    let session = gateway.create_session().await;
    assert_eq!(gateway.post_message(&session).await, 202);

    gateway.delete_behind_its_back(&session).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    let post = gateway.post_message(&session).await;
    let history = gateway.history(&session).await;

    assert_eq!(post, 404);
    assert_eq!(history, 404);
}

#[tokio::test]
async fn within_the_ttl_a_deletion_behind_the_gateways_back_is_not_yet_seen() {
    let gateway = TestGateway::spawn(Duration::from_secs(60)).await;
    let session = gateway.create_session().await;

    gateway.delete_behind_its_back(&session).await;
    let post = gateway.post_message(&session).await;

    // The documented staleness: the cached record still answers; the worker would drop the
    // message when it finds the session gone.
    assert_eq!(post, 202);
}

#[tokio::test]
async fn with_a_zero_ttl_every_request_reads_the_store() {
    let gateway = TestGateway::spawn(Duration::ZERO).await;
    let session = gateway.create_session().await;
    assert_eq!(gateway.post_message(&session).await, 202);

    gateway.delete_behind_its_back(&session).await;
    let post = gateway.post_message(&session).await;

    assert_eq!(post, 404);
}
