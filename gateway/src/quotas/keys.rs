//! API keys: who may create sessions, under which name, within which limits.
//!
//! Keys come from `--api-key` (no limits, each named `key-` and the first 8 hex digits of its
//! SHA-256) and from `--api-keys-file`, a TOML file listing keys by the SHA-256 of their value,
//! never the value itself:
//!
//! ```toml
//! [[key]]
//! name = "acme-web"                 # in logs, metrics and session records; never the key
//! sha256 = "9f86d0...a08"           # printf %s "$KEY" | sha256sum
//! session_messages_per_minute = 20  # one session's own pace
//! [key.limits]                      # the key as a whole
//! messages_per_minute = 600
//! open_streams = 200
//! sessions = 10000
//! tokens_per_day = 2000000
//! [key.per_user]                    # each end user (`user` of the session) of this key
//! messages_per_minute = 30
//! open_streams = 3
//! sessions = 20
//! tokens_per_day = 100000
//! ```
//!
//! The file is read again whenever its content changes ([`KeyRing::watch`]): adding a key,
//! changing a limit or revoking a key (removing its entry) needs no restart. A file that no
//! longer parses is refused with a logged error and the keys before it stay in force.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// How often the keys file is checked for changes.
pub const KEYS_FILE_POLL: Duration = Duration::from_secs(1);

/// The limits of one scope (an API key, or each end user of a key). None: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Messages accepted per minute (fixed UTC minutes).
    pub messages_per_minute: Option<u64>,
    /// Reply streams open at once (`Accept: text/event-stream` posts, `GET …/events`, AI SDK streams).
    pub open_streams: Option<u64>,
    /// Sessions existing at once (created and not deleted).
    pub sessions: Option<u64>,
    /// Model tokens (prompt + completion, as the model reports them) per UTC day.
    pub tokens_per_day: Option<u64>,
}

/// An API key as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    digest: [u8; 32],
    /// The key's limits as a whole.
    pub limits: Limits,
    /// The limits of each end user of the key.
    pub per_user: Limits,
    /// The most messages one session of the key may send per minute.
    pub session_messages_per_minute: Option<u64>,
}

/// One `[[key]]` of the keys file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    sha256: String,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    per_user: Limits,
    session_messages_per_minute: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

/// Why a keys file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read the API keys file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("the API keys file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The keys in force. Cheap to clone; clones share the keys, so a reload is seen by every one.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: Arc<RwLock<Arc<Vec<ApiKey>>>>,
    /// The keys given as flags, kept across reloads of the file.
    flag_keys: Arc<Vec<ApiKey>>,
    file: Option<PathBuf>,
    /// The file's content when it was loaded: [`KeyRing::watch`] takes any other as a change.
    loaded: Arc<Vec<u8>>,
}

impl KeyRing {
    /// The keys of `--api-key` and, if given, of the keys file. Fails on a file that cannot be
    /// read or parsed, so that a gateway never starts open by mistake.
    pub fn load(flag_keys: &[String], file: Option<&Path>) -> Result<Self, KeysError> {
        let flag_keys: Arc<Vec<ApiKey>> = Arc::new(flag_keys.iter().map(|k| flag_key(k)).collect());
        let mut keys = (*flag_keys).clone();
        let mut loaded = Vec::new();
        if let Some(path) = file {
            loaded = std::fs::read(path).map_err(|error| KeysError::Read { path: path.to_path_buf(), error })?;
            keys.extend(parse(path, &loaded)?);
        }
        check_unique(&keys)
            .map_err(|message| KeysError::Invalid { path: file.map(Path::to_path_buf).unwrap_or_default(), message })?;
        Ok(Self {
            keys: Arc::new(RwLock::new(Arc::new(keys))),
            flag_keys,
            file: file.map(Path::to_path_buf),
            loaded: Arc::new(loaded),
        })
    }

    /// Whether any key is configured: without one, anyone may create sessions (and nothing is
    /// limited).
    pub fn enforced(&self) -> bool {
        self.file.is_some() || !self.flag_keys.is_empty()
    }

    fn current(&self) -> Arc<Vec<ApiKey>> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The key whose value is `presented`, if any is. Every key's digest is compared in full,
    /// so timing reveals nothing about which part of a key matched.
    pub fn find(&self, presented: &str) -> Option<ApiKey> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let keys = self.current();
        let mut found = None;
        for key in keys.iter() {
            if constant_time_eq(&key.digest, &digest) {
                found = Some(key.clone());
            }
        }
        found
    }

    /// The key named `name`, unless it was revoked.
    pub fn by_name(&self, name: &str) -> Option<ApiKey> {
        self.current().iter().find(|k| k.name == name).cloned()
    }

    /// Re-reads the keys file whenever its content changes, until `closing`.
    pub async fn watch(self, closing: CancellationToken) {
        let Some(path) = self.file.clone() else { return };
        let mut last = Some((*self.loaded).clone());
        loop {
            tokio::select! {
                () = closing.cancelled() => return,
                () = tokio::time::sleep(KEYS_FILE_POLL) => {}
            }
            let content = match tokio::fs::read(&path).await {
                Ok(content) => content,
                Err(error) => {
                    if last.is_some() {
                        telemetry::api_keys_reload_failed(&KeysError::Read { path: path.clone(), error }.to_string());
                        last = None;
                    }
                    continue;
                }
            };
            if last.as_ref() == Some(&content) {
                continue;
            }
            last = Some(content.clone());
            match parse(&path, &content).and_then(|keys| self.replace_file_keys(&path, keys)) {
                Ok(count) => telemetry::api_keys_reloaded(count),
                Err(error) => telemetry::api_keys_reload_failed(&error.to_string()),
            }
        }
    }

    fn replace_file_keys(&self, path: &Path, file_keys: Vec<ApiKey>) -> Result<usize, KeysError> {
        let mut keys = (*self.flag_keys).clone();
        keys.extend(file_keys);
        check_unique(&keys).map_err(|message| KeysError::Invalid { path: path.to_path_buf(), message })?;
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(count)
    }
}

fn flag_key(value: &str) -> ApiKey {
    let digest: [u8; 32] = Sha256::digest(value.as_bytes()).into();
    let name = format!("key-{}", hex(&digest[..4]));
    ApiKey { name, digest, limits: Limits::default(), per_user: Limits::default(), session_messages_per_minute: None }
}

fn parse(path: &Path, content: &[u8]) -> Result<Vec<ApiKey>, KeysError> {
    let invalid = |message: String| KeysError::Invalid { path: path.to_path_buf(), message };
    let text = std::str::from_utf8(content).map_err(|_| invalid("it is not UTF-8 text".into()))?;
    let file: KeysFile = toml::from_str(text).map_err(|e| invalid(e.message().to_owned()))?;
    file.key
        .into_iter()
        .map(|entry| {
            if !valid_name(&entry.name) {
                return Err(invalid(format!(
                    "key name {:?} must be 1 to 64 of A-Z a-z 0-9 _ . -",
                    entry.name.chars().take(80).collect::<String>()
                )));
            }
            let digest = parse_digest(&entry.sha256).ok_or_else(|| {
                invalid(format!(
                    "key {}: sha256 must be 64 hexadecimal digits (printf %s \"$KEY\" | sha256sum)",
                    entry.name
                ))
            })?;
            Ok(ApiKey {
                name: entry.name,
                digest,
                limits: entry.limits,
                per_user: entry.per_user,
                session_messages_per_minute: entry.session_messages_per_minute,
            })
        })
        .collect()
}

fn check_unique(keys: &[ApiKey]) -> Result<(), String> {
    let mut names = HashSet::new();
    let mut digests = HashSet::new();
    for key in keys {
        if !names.insert(key.name.as_str()) {
            return Err(format!("two keys are named {}", key.name));
        }
        if !digests.insert(key.digest) {
            return Err(format!("key {} has the same value as another key", key.name));
        }
    }
    Ok(())
}

/// Key names appear in metric labels, counter names and logs: a plain, short alphabet.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(value: &str) -> String {
        hex(&Sha256::digest(value.as_bytes()))
    }

    fn write(dir: &tempfile::TempDir, content: &str) -> PathBuf {
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn a_key_is_found_by_its_value_and_carries_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            &format!(
                "[[key]]\nname = \"acme\"\nsha256 = \"{}\"\nsession_messages_per_minute = 5\n[key.limits]\nmessages_per_minute = 60\n[key.per_user]\nopen_streams = 2\n",
                sha256_hex("s3cret")
            ),
        );

        let ring = KeyRing::load(&[], Some(&path)).unwrap();

        let key = ring.find("s3cret").unwrap();
        assert_eq!(key.name, "acme");
        assert_eq!(key.limits.messages_per_minute, Some(60));
        assert_eq!(key.per_user.open_streams, Some(2));
        assert_eq!(key.session_messages_per_minute, Some(5));
        assert!(ring.find("s3cret ").is_none());
        assert!(ring.enforced());
    }

    #[test]
    fn flag_keys_are_named_by_their_digest_and_unlimited() {
        let ring = KeyRing::load(&["k1".to_owned()], None).unwrap();

        let key = ring.find("k1").unwrap();

        assert_eq!(key.name, format!("key-{}", &sha256_hex("k1")[..8]));
        assert_eq!(key.limits, Limits::default());
        assert!(!KeyRing::load(&[], None).unwrap().enforced());
    }

    #[test]
    fn a_bad_keys_file_is_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("[[key]]\nname = \"a b\"\nsha256 = \"00\"\n", "key name"),
            ("[[key]]\nname = \"a\"\nsha256 = \"00\"\n", "64 hexadecimal digits"),
            ("[[key]]\nname = \"a\"\nsha256 = \"00\"\nlimit = 3\n", "unknown field"),
            ("[[key]]\nname = \"a\"\n", "sha256"),
        ];
        for (content, expected) in cases {
            let path = write(&dir, content);
            let error = KeyRing::load(&[], Some(&path)).unwrap_err().to_string();
            assert!(error.contains(expected), "{content:?}: {error}");
        }
        let twice = format!(
            "[[key]]\nname = \"a\"\nsha256 = \"{0}\"\n[[key]]\nname = \"a\"\nsha256 = \"{1}\"\n",
            sha256_hex("x"),
            sha256_hex("y")
        );
        let path = write(&dir, &twice);
        assert!(KeyRing::load(&[], Some(&path)).unwrap_err().to_string().contains("two keys are named a"));
        assert!(KeyRing::load(&[], Some(&dir.path().join("missing.toml"))).is_err());
    }

    #[tokio::test]
    async fn a_changed_keys_file_is_in_force_without_a_restart_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let entry =
            |name: &str, value: &str| format!("[[key]]\nname = \"{name}\"\nsha256 = \"{}\"\n", sha256_hex(value));
        let path = write(&dir, &entry("old", "v-old"));
        let ring = KeyRing::load(&[], Some(&path)).unwrap();
        let closing = CancellationToken::new();
        tokio::spawn(ring.clone().watch(closing.clone()));

        write(&dir, &entry("new", "v-new"));
        let reloaded = wait_until(|| ring.find("v-new").is_some()).await;
        assert!(reloaded, "the new key was not taken up");
        assert!(ring.find("v-old").is_none(), "the revoked key still works");
        assert!(ring.by_name("old").is_none());

        write(&dir, "[[key]\nbroken");
        tokio::time::sleep(KEYS_FILE_POLL * 3).await;
        assert!(ring.find("v-new").is_some(), "a broken file replaced the keys in force");
        closing.cancel();
    }

    async fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
        for _ in 0..50 {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}
