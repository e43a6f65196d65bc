//! The gateway: chatfleet's public HTTP API (`../shared/http-api.md`), the chat page, and the
//! operational endpoints. It turns requests into bus envelopes and reply events into
//! Server-Sent Events.
//!
//! Invariants: the gateway never calls the model and holds no per-session state beyond a
//! cache of session records that lives seconds (`session_cache`), so any replica can serve
//! any request; it answers 202 only once the bus has the message.

mod auth;
mod body;
pub mod channels;
mod error;
mod extract;
pub mod health;
#[cfg(test)]
mod properties;
pub mod quotas;
mod routes;
mod server;
mod session_cache;
mod sse;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use bus::Bus;
use metrics_exporter_prometheus::PrometheusHandle;
use rand::RngCore;
use schemas::DoubleTexting;
use session_cache::SessionCache;
use store::Store;
use tokio_util::sync::CancellationToken;

pub use auth::TokenKey;
pub use error::ApiError;
pub use quotas::{KeyRing, KeysError};
pub use server::HttpLimits;

/// How the gateway behaves.
#[derive(Clone)]
pub struct GatewayConfig {
    /// Keys allowed to create sessions, with their limits; none means anyone may, unlimited.
    pub api_keys: KeyRing,
    /// The key session tokens are signed with. None: use the deployment's key kept in the
    /// store (created by the first gateway), so every replica agrees without configuration.
    pub token_key: Option<Vec<u8>>,
    /// Former token keys, each accepted until its deadline (rotation of `token_key`).
    pub previous_token_keys: Vec<(Vec<u8>, time::OffsetDateTime)>,
    /// How long an idle reply stream waits between keep-alive comments.
    pub keep_alive: Duration,
    /// How long a readiness probe waits for the bus and the store.
    pub readiness_timeout: Duration,
    /// The double-texting policy of sessions created without one.
    pub double_texting: DoubleTexting,
    /// How long a session record read from the store (or just created) is kept in memory,
    /// so that requests for the session need no store read to know it exists. Zero disables
    /// the cache; at most an hour is used. The cost is staleness after a deletion: the
    /// gateway that deletes a session forgets it at once, but another replica may accept
    /// messages for it for up to this long, which the worker then drops with a `session_not_found`
    /// error event.
    pub session_cache_ttl: Duration,
    /// How long a streamed reply may go without an event before the gateway asks the store
    /// whether the message has its outcome already. Reply events travel best-effort, and a
    /// worker stores the outcome before it announces it, so a lost `done` or `error` is found
    /// there and the stream still ends with it.
    pub reply_check: Duration,
    /// Limits on request headers, their pace and open connections.
    pub http: HttpLimits,
    /// The chat platforms and webhook integrations this gateway serves (`--channels`); none by
    /// default. A gateway with any also delivers channel replies.
    pub channels: channels::ChannelsConfig,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("api_keys", &if self.api_keys.enforced() { "configured" } else { "none" })
            .field("token_key", &self.token_key.as_ref().map(|_| "***"))
            .field("previous_token_keys", &self.previous_token_keys.len())
            .field("keep_alive", &self.keep_alive)
            .field("readiness_timeout", &self.readiness_timeout)
            .field("double_texting", &self.double_texting)
            .field("session_cache_ttl", &self.session_cache_ttl)
            .field("reply_check", &self.reply_check)
            .field("http", &self.http)
            .field("channels", &self.channels)
            .finish()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            api_keys: KeyRing::default(),
            token_key: None,
            previous_token_keys: Vec::new(),
            keep_alive: Duration::from_secs(15),
            readiness_timeout: Duration::from_secs(1),
            double_texting: DoubleTexting::Enqueue,
            session_cache_ttl: Duration::from_secs(2),
            reply_check: Duration::from_secs(10),
            http: HttpLimits::default(),
            channels: channels::ChannelsConfig::default(),
        }
    }
}

/// What every request handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) tokens: TokenKey,
    pub(crate) config: Arc<GatewayConfig>,
    /// Recently seen session records, so that most requests skip the store read of their
    /// session.
    pub(crate) sessions: SessionCache,
    pub(crate) metrics: Option<PrometheusHandle>,
    /// Cancelled when the gateway shuts down; open reply streams end then, so that a
    /// graceful shutdown does not wait forever on them.
    pub(crate) closing: CancellationToken,
    /// The channels served, and their delivery adapters.
    pub(crate) channels: Arc<channels::Channels>,
    /// API keys and the limits on what each may use.
    pub(crate) quotas: Arc<quotas::Quotas>,
}

/// Name of the store-held token key.
const TOKEN_KEY_NAME: &str = "session-token-key-v1";

/// A gateway ready to serve.
#[derive(Clone)]
pub struct Gateway {
    state: AppState,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("config", &self.state.config).finish_non_exhaustive()
    }
}

impl Gateway {
    /// Prepares a gateway. Without a configured token key it loads (or creates) the
    /// deployment's key from the store.
    pub async fn build(
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        config: GatewayConfig,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, store::StoreError> {
        let key = match &config.token_key {
            Some(key) => key.clone(),
            None => {
                let mut proposed = vec![0u8; 32];
                rand::rng().fill_bytes(&mut proposed);
                store.shared_secret(TOKEN_KEY_NAME, &proposed).await?
            }
        };
        let channels = Arc::new(channels::Channels::new(config.channels.clone(), store.clone()));
        let quotas = Arc::new(quotas::Quotas::new(config.api_keys.clone(), store.clone()));
        let tokens = TokenKey::new(key).with_previous(config.previous_token_keys.clone());
        let state = AppState {
            bus,
            channels,
            quotas,
            store,
            tokens,
            sessions: SessionCache::new(config.session_cache_ttl),
            config: Arc::new(config),
            metrics,
            closing: CancellationToken::new(),
        };
        Ok(Self { state })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        routes::router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves; open streams are then closed.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router();
        let closing = self.state.closing.clone();
        tokio::spawn(async move {
            shutdown.await;
            closing.cancel();
        });
        tokio::spawn(self.state.quotas.keys.clone().watch(self.state.closing.clone()));
        tokio::spawn(Arc::clone(&self.state.quotas).renew_stream_reports(self.state.closing.clone()));
        if self.state.channels.any() {
            tokio::spawn(channels::delivery::run(self.state.clone(), self.state.closing.clone()));
        }
        server::serve(listener, router, &self.state.config.http, self.state.closing.clone()).await
    }
}
