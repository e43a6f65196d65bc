//! Slack's v0 request signatures: `X-Slack-Signature` is `v0=` and the hex HMAC-SHA256 of
//! `v0:{X-Slack-Request-Timestamp}:{raw body}` keyed with the signing secret; a timestamp more
//! than 5 minutes away is refused, against replays.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::channels::Rejection;
use crate::channels::config::Secret;

const TOLERANCE_SECS: i64 = 5 * 60;

/// Checks a request's signature against its raw body, in constant time.
pub(crate) fn verify(secret: &Secret, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), Rejection> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
    let (Some(timestamp), Some(signature)) = (header("x-slack-request-timestamp"), header("x-slack-signature")) else {
        return Err(Rejection::MissingSignature);
    };
    let at: i64 = timestamp.parse().map_err(|_| Rejection::BadSignature)?;
    // `abs_diff`: a timestamp near i64::MIN or MAX must not overflow the subtraction.
    if now.abs_diff(at) > TOLERANCE_SECS.unsigned_abs() {
        return Err(Rejection::StaleTimestamp);
    }
    let expected = signature.strip_prefix("v0=").and_then(decode_hex).ok_or(Rejection::BadSignature)?;
    mac(secret, timestamp, body).verify_slice(&expected).map_err(|_| Rejection::BadSignature)
}

fn mac(secret: &Secret, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes a key of any length");
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slack's documented example ("Verifying requests from Slack").
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";

    fn headers(signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-slack-request-timestamp", "1531420618".parse().unwrap());
        headers.insert("x-slack-signature", signature.parse().unwrap());
        headers
    }

    #[test]
    fn slacks_known_answer_verifies_and_a_changed_body_or_old_timestamp_does_not() {
        let secret = Secret::new("8f742231b10e8888abcd99yyyzzz85a5");
        let good = headers("v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503");

        assert_eq!(verify(&secret, &good, BODY.as_bytes(), 1531420618 + 10), Ok(()));
        assert_eq!(verify(&secret, &good, b"token=other", 1531420618), Err(Rejection::BadSignature));
        assert_eq!(verify(&secret, &good, BODY.as_bytes(), 1531420618 + 301), Err(Rejection::StaleTimestamp));
        assert_eq!(verify(&secret, &headers("v0=zz"), BODY.as_bytes(), 1531420618), Err(Rejection::BadSignature));
        assert_eq!(verify(&secret, &HeaderMap::new(), BODY.as_bytes(), 1531420618), Err(Rejection::MissingSignature));
    }
}
