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

type HmacSha256 = Hmac<Sha256>;

/// Domain separation, so the key's signatures mean nothing elsewhere.
const TOKEN_CONTEXT: &[u8] = b"chatfleet session token v1\0";

/// Signs and verifies session tokens.
#[derive(Clone)]
pub struct TokenKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(***)")
    }
}

impl TokenKey {
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    fn mac(&self, session: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(TOKEN_CONTEXT);
        mac.update(session.as_bytes());
        mac
    }

    pub fn issue(&self, session: &SessionId) -> String {
        let signature = self.mac(session.as_str()).finalize().into_bytes();
        format!("v1.{}.{}", session, URL_SAFE_NO_PAD.encode(signature))
    }

    /// The session a token was issued for, if it is genuine.
    pub fn verify(&self, token: &str) -> Option<SessionId> {
        let rest = token.strip_prefix("v1.")?;
        let (session, signature) = rest.rsplit_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        // Constant-time comparison.
        self.mac(session).verify_slice(&signature).ok()?;
        SessionId::parse(session).ok()
    }
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

/// Checks the API key of a session-creating request, when keys are configured.
pub fn authorize_api_key(keys: &[String], token: Option<String>) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
    }
    let token = token.ok_or_else(|| {
        ApiError::Unauthorized("creating a session needs an API key, as 'Authorization: Bearer <api key>'".into())
    })?;
    // Compare every key in full so that timing does not reveal how much of a key matched.
    let matched = keys.iter().fold(false, |found, key| found | constant_time_eq(key.as_bytes(), token.as_bytes()));
    if matched { Ok(()) } else { Err(ApiError::Unauthorized("the API key is not valid".into())) }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    fn api_keys_are_enforced_only_when_configured() {
        assert!(authorize_api_key(&[], None).is_ok());
        let keys = vec!["secret-1".to_owned()];
        assert!(authorize_api_key(&keys, None).is_err());
        assert!(authorize_api_key(&keys, Some("secret-2".into())).is_err());
        assert!(authorize_api_key(&keys, Some("secret-1".into())).is_ok());
    }
}
