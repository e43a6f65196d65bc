//! Who may do what: API keys for creating sessions, and session tokens that any gateway
//! replica verifies on its own.
//!
//! A session token is `v1.<session_id>.<signature>`, the signature being HMAC-SHA256 of the
//! session id under the deployment's token key (base64url, unpadded). Verifying one needs
//! only the key, so gateways share no per-session state.

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use schemas::SessionId;
use sha2::Sha256;

use crate::error::ApiError;
use crate::quotas::{ApiKey, KeyRing};

type HmacSha256 = Hmac<Sha256>;

/// Domain separation, so the key's signatures mean nothing elsewhere.
const TOKEN_CONTEXT: &[u8] = b"chatfleet session token v1\0";

/// Signs and verifies session tokens.
#[derive(Clone)]
pub struct TokenKey {
    key: Vec<u8>,
    /// Former keys and the time until which their tokens are still accepted.
    previous: Vec<(Vec<u8>, time::OffsetDateTime)>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(***)")
    }
}

impl TokenKey {
    pub fn new(key: Vec<u8>) -> Self {
        Self { key, previous: Vec::new() }
    }

    /// Also accepts the tokens of each former key until its deadline (key rotation); new
    /// tokens are signed with the current key only.
    pub fn with_previous(mut self, previous: Vec<(Vec<u8>, time::OffsetDateTime)>) -> Self {
        self.previous = previous;
        self
    }

    fn mac(&self, session: &str) -> HmacSha256 {
        mac_with(&self.key, session)
    }

    pub fn issue(&self, session: &SessionId) -> String {
        let signature = self.mac(session.as_str()).finalize().into_bytes();
        format!("v1.{}.{}", session, URL_SAFE_NO_PAD.encode(signature))
    }

    /// The session a token was issued for, if it is genuine: signed by the current key, or by
    /// a former one before its deadline.
    pub fn verify(&self, token: &str) -> Option<SessionId> {
        let rest = token.strip_prefix("v1.")?;
        let (session, signature) = rest.rsplit_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        // Constant-time comparisons.
        let genuine = self.mac(session).verify_slice(&signature).is_ok() || {
            let now = time::OffsetDateTime::now_utc();
            self.previous
                .iter()
                .filter(|(_, deadline)| now < *deadline)
                .any(|(key, _)| mac_with(key, session).verify_slice(&signature).is_ok())
        };
        if !genuine {
            return None;
        }
        SessionId::parse(session).ok()
    }
}

fn mac_with(key: &[u8], session: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(TOKEN_CONTEXT);
    mac.update(session.as_bytes());
    mac
}

/// The bearer credential of a request: the `Authorization: Bearer` header, else the
/// `access_token` query parameter (browsers' EventSource cannot set headers).
pub fn bearer(headers: &HeaderMap, access_token: Option<&str>) -> Option<String> {
    let from_header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| t.trim().to_owned());
    from_header.or_else(|| access_token.map(str::to_owned)).filter(|t| !t.is_empty())
}

/// Checks that the request carries a token for `session`.
pub fn authorize_session(key: &TokenKey, token: Option<String>, session: &str) -> Result<SessionId, ApiError> {
    let token = token.ok_or_else(|| {
        ApiError::Unauthorized(
            "this call needs the session's token, as 'Authorization: Bearer <token>' or '?access_token=<token>'".into(),
        )
    })?;
    let owner = key.verify(&token).ok_or_else(|| ApiError::Unauthorized("the session token is not valid".into()))?;
    if owner.as_str() != session {
        return Err(ApiError::Forbidden);
    }
    Ok(owner)
}

/// Checks the API key of a session-creating request, when keys are configured, and returns it.
pub fn authorize_api_key(keys: &KeyRing, token: Option<String>) -> Result<Option<ApiKey>, ApiError> {
    if !keys.enforced() {
        return Ok(None);
    }
    let token = token.ok_or_else(|| {
        ApiError::Unauthorized("creating a session needs an API key, as 'Authorization: Bearer <api key>'".into())
    })?;
    keys.find(&token).map(Some).ok_or_else(|| ApiError::Unauthorized("the API key is not valid".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_for_its_own_session_only() {
        let key = TokenKey::new(b"k".to_vec());
        let s = SessionId::parse("abc").unwrap();
        let token = key.issue(&s);
        assert_eq!(key.verify(&token), Some(s));
        assert!(authorize_session(&key, Some(token.clone()), "other").is_err());
        assert!(matches!(authorize_session(&key, Some(token), "other"), Err(ApiError::Forbidden)));
    }

    #[test]
    fn tampered_or_foreign_key_tokens_are_rejected() {
        let key = TokenKey::new(b"k".to_vec());
        let token = key.issue(&SessionId::parse("abc").unwrap());
        assert_eq!(TokenKey::new(b"other".to_vec()).verify(&token), None);
        assert_eq!(key.verify(&token.replace("abc", "abd")), None);
        assert_eq!(key.verify("garbage"), None);
        assert_eq!(key.verify(""), None);
    }

    #[test]
    fn tokens_of_a_previous_key_are_accepted_until_its_deadline_only() {
        let session = SessionId::parse("abc").unwrap();
        let old_token = TokenKey::new(b"old".to_vec()).issue(&session);
        let now = time::OffsetDateTime::now_utc();

        let rotating =
            TokenKey::new(b"new".to_vec()).with_previous(vec![(b"old".to_vec(), now + time::Duration::hours(1))]);
        let past_deadline =
            TokenKey::new(b"new".to_vec()).with_previous(vec![(b"old".to_vec(), now - time::Duration::seconds(1))]);

        assert_eq!(rotating.verify(&old_token), Some(session.clone()));
        assert_eq!(past_deadline.verify(&old_token), None);
        let new_token = rotating.issue(&session);
        assert_ne!(new_token, old_token, "new tokens must be signed with the new key");
        assert_eq!(TokenKey::new(b"new".to_vec()).verify(&new_token), Some(session));
    }

    #[test]
    fn api_keys_are_enforced_only_when_configured() {
        assert!(authorize_api_key(&KeyRing::default(), None).unwrap().is_none());
        let keys = KeyRing::load(&["secret-1".to_owned()], None).unwrap();
        assert!(authorize_api_key(&keys, None).is_err());
        assert!(authorize_api_key(&keys, Some("secret-2".into())).is_err());
        assert!(authorize_api_key(&keys, Some("secret-1".into())).unwrap().is_some());
    }
}
