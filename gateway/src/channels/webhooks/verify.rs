//! Standard Webhooks 1.0 signatures, both ways: `webhook-signature` is `v1,` followed by the
//! base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the
//! base64-decoded part of the secret after `whsec_`; a header may carry several
//! space-separated signatures (during a key rotation), any one of which may match.

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::channels::Rejection;
use crate::channels::config::Secret;

/// How far a request's timestamp may be from now, either way.
pub(crate) const TOLERANCE_SECS: i64 = 5 * 60;

/// An integration's HMAC key. Never shown.
#[derive(Clone)]
pub(crate) struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

impl SigningKey {
    /// The key of a `whsec_...` secret. The error never shows the secret.
    pub(crate) fn from_secret(secret: &Secret) -> Result<Self, String> {
        let encoded = secret
            .expose()
            .strip_prefix("whsec_")
            .ok_or("a Standard Webhooks secret is \"whsec_\" followed by base64")?;
        let key = STANDARD.decode(encoded).map_err(|_| "the part after \"whsec_\" is not valid base64".to_owned())?;
        if key.len() < 16 {
            return Err("the key is shorter than 16 bytes".into());
        }
        Ok(Self(key))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header value of a delivery.
    pub(crate) fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let signature = self.mac(id, &timestamp.to_string(), body).finalize().into_bytes();
        format!("v1,{}", STANDARD.encode(signature))
    }

    /// Checks an inbound request's headers against its raw body; returns its `webhook-id`.
    pub(crate) fn verify<'h>(&self, headers: &'h HeaderMap, body: &[u8], now: i64) -> Result<&'h str, Rejection> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
        let (Some(id), Some(timestamp), Some(signatures)) =
            (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"))
        else {
            return Err(Rejection::MissingSignature);
        };
        let at: i64 = timestamp.parse().map_err(|_| Rejection::BadSignature)?;
        // `abs_diff`: a timestamp near i64::MIN or MAX must not overflow the subtraction.
        if now.abs_diff(at) > TOLERANCE_SECS.unsigned_abs() {
            return Err(Rejection::StaleTimestamp);
        }
        let mac = self.mac(id, timestamp, body);
        let matches = signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|s| STANDARD.decode(s).ok())
            // Constant time, each one.
            .any(|signature| mac.clone().verify_slice(&signature).is_ok());
        if matches { Ok(id) } else { Err(Rejection::BadSignature) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_secret(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap()
    }

    /// The example of the Standard Webhooks specification's reference libraries.
    #[test]
    fn signing_matches_the_reference_libraries_example() {
        let body = br#"{"test": 2432232314}"#;

        let signature = key().sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);

        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn any_one_of_several_signatures_may_match_and_a_tampered_body_fails() {
        let body = b"{}";
        let good = key().sign("msg_1", 1000, body);
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().unwrap());
        headers.insert("webhook-timestamp", "1000".parse().unwrap());
        headers.insert("webhook-signature", format!("v1,AAAA {good}").parse().unwrap());

        assert_eq!(key().verify(&headers, body, 1100).unwrap(), "msg_1");
        assert!(matches!(key().verify(&headers, b"{ }", 1100), Err(Rejection::BadSignature)));
        assert!(matches!(key().verify(&headers, body, 1000 + 301), Err(Rejection::StaleTimestamp)));
        assert!(matches!(key().verify(&HeaderMap::new(), body, 1000), Err(Rejection::MissingSignature)));
    }
}
