//! The Bot Framework's request tokens: `Authorization: Bearer <JWT>`, signed (RS256, RS384 or
//! RS512) by a key of the JWKS that the OpenID metadata names, issued by
//! `https://api.botframework.com` for this bot (audience = the App ID), within its lifetime
//! (5 minutes of clock skew either way). The body's activity must then agree with it: its
//! `serviceUrl` is the token's `serviceurl` claim, and its `channelId` is one of the signing
//! key's `endorsements`, as the Bot Framework SDKs check.
//!
//! The keys are cached for a day and fetched again when a token names a key the cache lacks
//! (the Bot Framework rotates its keys), at most once every [`REFRESH_AT_MOST_EVERY`], so that
//! tokens naming made-up keys cannot turn the gateway into a client hammering the metadata.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

use crate::channels::Rejection;
use crate::channels::config::checked_url;

/// The issuer of every token the Bot Framework sends to bots.
pub(crate) const ISSUER: &str = "https://api.botframework.com";
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5 * 60;
/// How long fetched keys are used before they are fetched again.
const KEYS_KEPT_FOR: Duration = Duration::from_secs(24 * 3600);
/// The shortest time between two fetches of the keys.
pub(crate) const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(1);
/// The signature algorithms the Bot Framework uses.
const ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];

/// A verified token: what its claims say the activity must agree with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    /// The `serviceurl` claim.
    pub(crate) service_url: Option<String>,
    /// The channels (`msteams`, `webchat`, ...) the signing key is endorsed for.
    pub(crate) endorsements: Vec<String>,
}

impl Verified {
    /// Checks the activity against the token: the same `serviceUrl`, and a `channelId` the key
    /// is endorsed for.
    pub(crate) fn admits(&self, service_url: &str, channel_id: &str) -> Result<(), Rejection> {
        if self.service_url.as_deref() != Some(service_url) {
            return Err(Rejection::ServiceUrlMismatch);
        }
        if !self.endorsements.iter().any(|e| e == channel_id) {
            return Err(Rejection::NotEndorsed);
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    serviceurl: Option<String>,
}

/// Why the signing keys are not at hand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeysError {
    #[error("the Bot Framework's signing keys cannot be fetched: {0}")]
    Unavailable(String),
}

/// What checking a request's token found.
#[derive(Debug)]
pub(crate) enum Checked {
    Valid(Verified),
    Refused(Rejection),
    /// The keys could not be fetched: the request may be fine; the platform should try again.
    KeysUnavailable(KeysError),
}

/// One signing key of the JWKS.
struct Key {
    decoding: DecodingKey,
    endorsements: Vec<String>,
}

#[derive(Default)]
struct Cache {
    keys: HashMap<String, Arc<Key>>,
    fetched: Option<Instant>,
}

/// The Bot Framework's signing keys, fetched through its OpenID metadata and cached.
pub(crate) struct Keys {
    metadata_url: reqwest::Url,
    http: reqwest::Client,
    cache: RwLock<Cache>,
    /// One fetch at a time; those waiting use its result.
    fetching: Mutex<()>,
}

#[derive(Deserialize)]
struct Metadata {
    jwks_uri: String,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kid: Option<String>,
    kty: String,
    n: Option<String>,
    e: Option<String>,
    #[serde(default)]
    endorsements: Vec<String>,
}

impl Keys {
    pub(crate) fn new(metadata_url: reqwest::Url, http: reqwest::Client) -> Self {
        Self { metadata_url, http, cache: RwLock::new(Cache::default()), fetching: Mutex::new(()) }
    }

    /// The key named `kid`: from the cache while it is fresh, otherwise fetched again.
    async fn key(&self, kid: &str) -> Result<Option<Arc<Key>>, KeysError> {
        if let Some(key) = self.cached(kid).await {
            return Ok(Some(key));
        }
        let _fetching = self.fetching.lock().await;
        // Another request may have fetched the keys while this one waited.
        if let Some(key) = self.cached(kid).await {
            return Ok(Some(key));
        }
        let recent = self.cache.read().await.fetched.is_some_and(|at| at.elapsed() < REFRESH_AT_MOST_EVERY);
        if !recent {
            let keys = self.fetch().await?;
            tracing::info!(event = "teams_keys_fetched", keys = keys.len());
            *self.cache.write().await = Cache { keys, fetched: Some(Instant::now()) };
        }
        Ok(self.cache.read().await.keys.get(kid).cloned())
    }

    async fn cached(&self, kid: &str) -> Option<Arc<Key>> {
        let cache = self.cache.read().await;
        let fresh = cache.fetched.is_some_and(|at| at.elapsed() < KEYS_KEPT_FOR);
        fresh.then(|| cache.keys.get(kid).cloned()).flatten()
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<Key>>, KeysError> {
        let metadata: Metadata = self.get_json(self.metadata_url.clone()).await?;
        let jwks_uri =
            checked_url("the OpenID metadata's jwks_uri", &metadata.jwks_uri, false).map_err(KeysError::Unavailable)?;
        let jwks: Jwks = self.get_json(jwks_uri).await?;
        let mut keys = HashMap::new();
        for jwk in jwks.keys {
            let (Some(kid), Some(n), Some(e)) = (jwk.kid, jwk.n, jwk.e) else { continue };
            if jwk.kty != "RSA" {
                continue;
            }
            match DecodingKey::from_rsa_components(&n, &e) {
                Ok(decoding) => {
                    keys.insert(kid, Arc::new(Key { decoding, endorsements: jwk.endorsements }));
                }
                Err(e) => tracing::warn!(event = "teams_key_unreadable", kid, error = %e, "skipping a signing key"),
            }
        }
        Ok(keys)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: reqwest::Url) -> Result<T, KeysError> {
        let unavailable = |e: reqwest::Error| KeysError::Unavailable(e.without_url().to_string());
        let response = self.http.get(url).send().await.map_err(unavailable)?;
        let status = response.status();
        if !status.is_success() {
            return Err(KeysError::Unavailable(format!("HTTP {status}")));
        }
        response.json().await.map_err(unavailable)
    }

    /// Checks a request's `Authorization` header: a token the Bot Framework issued for this bot.
    pub(crate) async fn check(&self, headers: &HeaderMap, app_id: &str) -> Checked {
        let Some(token) = bearer(headers) else {
            return Checked::Refused(Rejection::MissingToken);
        };
        let header = match jsonwebtoken::decode_header(token) {
            Ok(header) => header,
            Err(_) => return Checked::Refused(Rejection::BadToken("it is not a JWT".into())),
        };
        if !ALGORITHMS.contains(&header.alg) {
            return Checked::Refused(Rejection::BadToken(format!("{:?} is not a Bot Framework algorithm", header.alg)));
        }
        let Some(kid) = header.kid else {
            return Checked::Refused(Rejection::BadToken("it names no signing key".into()));
        };
        let key = match self.key(&kid).await {
            Ok(Some(key)) => key,
            Ok(None) => return Checked::Refused(Rejection::BadToken("it is signed by an unknown key".into())),
            Err(e) => return Checked::KeysUnavailable(e),
        };
        match validate(token, &key, header.alg, app_id) {
            Ok(claims) => {
                Checked::Valid(Verified { service_url: claims.serviceurl, endorsements: key.endorsements.clone() })
            }
            Err(rejection) => Checked::Refused(rejection),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// Signature, issuer, audience and lifetime.
fn validate(token: &str, key: &Key, alg: Algorithm, app_id: &str) -> Result<Claims, Rejection> {
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[app_id]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(|e| match e.kind() {
        ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => Rejection::ExpiredToken,
        ErrorKind::InvalidAudience => Rejection::WrongAudience,
        ErrorKind::InvalidIssuer => Rejection::BadToken("it is not issued by the Bot Framework".into()),
        ErrorKind::InvalidSignature => Rejection::BadToken("its signature does not match".into()),
        ErrorKind::MissingRequiredClaim(claim) => Rejection::BadToken(format!("it has no {claim} claim")),
        _ => Rejection::BadToken("it cannot be read".into()),
    })?;
    Ok(data.claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified() -> Verified {
        Verified {
            service_url: Some("https://smba.trafficmanager.net/amer/".into()),
            endorsements: vec!["msteams".into(), "webchat".into()],
        }
    }

    #[test]
    fn an_activity_must_name_the_tokens_service_url_and_an_endorsed_channel() {
        let token = verified();

        assert_eq!(token.admits("https://smba.trafficmanager.net/amer/", "msteams"), Ok(()));
        assert_eq!(token.admits("https://evil.example.com/", "msteams"), Err(Rejection::ServiceUrlMismatch));
        assert_eq!(token.admits("https://smba.trafficmanager.net/amer/", "slack"), Err(Rejection::NotEndorsed));
        let unendorsed = Verified { endorsements: vec![], ..verified() };
        assert_eq!(unendorsed.admits("https://smba.trafficmanager.net/amer/", "msteams"), Err(Rejection::NotEndorsed));
    }

    #[test]
    fn only_a_bearer_token_is_taken() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        headers.insert("authorization", "Bearer abc.def.ghi".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc.def.ghi"));
    }
}
