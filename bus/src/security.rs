//! How a process proves itself to a broker and checks the broker's identity: the TLS files
//! both brokers share (a CA to trust, a client certificate and key for mutual TLS) and NATS's
//! own kinds of credentials. Secrets are held in [`Secret`], which never prints its value.

use std::path::{Path, PathBuf};

use crate::BusError;

/// A password, token or key: `Debug` and `Display` show `***`, so that settings can be logged
/// and errors formatted without leaking it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// TLS towards a broker beyond what its URL says (`tls://` or `amqps://`): a CA to trust in
/// addition to the system's, and a client certificate for brokers that verify clients
/// (mutual TLS). PEM files; the key may be PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates (PEM) that may sign the broker's certificate.
    pub ca: Option<PathBuf>,
    /// This client's certificate chain (PEM), sent when the broker asks for one.
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of [`TlsFiles::cert`].
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// True when any TLS file is configured, which makes TLS required.
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// Checks that a certificate comes with its key and that every named file is readable, so
    /// that a typo is reported as such rather than as a failed handshake.
    pub fn check(&self) -> Result<(), BusError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(BusError::Unsupported(
                "a client certificate needs its key and a key its certificate (--bus-tls-cert with --bus-tls-key)"
                    .into(),
            ));
        }
        for (what, path) in [("CA", &self.ca), ("client certificate", &self.cert), ("client key", &self.key)] {
            if let Some(path) = path {
                readable(what, path)?;
            }
        }
        Ok(())
    }

    /// The files' contents as lapin's TLS settings (RabbitMQ).
    pub(crate) fn read_for_amqp(&self) -> Result<lapin::tcp::OwnedTLSConfig, BusError> {
        self.check()?;
        let cert_chain = match &self.ca {
            Some(path) => Some(read_text("CA", path)?),
            None => None,
        };
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
                pem: read_bytes("client certificate", cert)?,
                key: read_bytes("client key", key)?,
            }),
            _ => None,
        };
        Ok(lapin::tcp::OwnedTLSConfig { identity, cert_chain })
    }
}

/// How a NATS client authenticates, besides credentials in the URL
/// (`nats://user:password@host`, `nats://token@host`), which the client uses as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// Whatever the URL carries, if anything.
    #[default]
    FromUrl,
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
    /// A file holding an NKey seed (`SU...`), as `nsc` or `nk -gen user` write it.
    NKeySeedFile(PathBuf),
    /// A `.creds` file (a user JWT and its NKey seed), as `nsc` writes it for operator mode.
    CredsFile(PathBuf),
}

impl NatsAuth {
    /// The credentials in the first of the servers' URLs that carries any: `user:password@`
    /// or `token@` (percent-encoded as URLs require). The client library does not read them
    /// from the URL itself.
    pub(crate) fn in_urls(servers: &[&str]) -> NatsAuth {
        for server in servers {
            let Ok(address) = server.parse::<async_nats::ServerAddr>() else { continue };
            match (address.username(), address.password()) {
                (Some(user), Some(password)) => {
                    return NatsAuth::UserPassword {
                        user: percent_decode(user),
                        password: Secret::new(percent_decode(password)),
                    };
                }
                (Some(token), None) => return NatsAuth::Token(Secret::new(percent_decode(token))),
                _ => {}
            }
        }
        NatsAuth::FromUrl
    }

    /// Adds these credentials to a client's options.
    pub(crate) async fn apply(
        &self,
        options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, BusError> {
        Ok(match self {
            NatsAuth::FromUrl => options,
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose().to_owned())
            }
            NatsAuth::Token(token) => options.token(token.expose().to_owned()),
            NatsAuth::NKeySeedFile(path) => {
                let seed = read_text("NKey seed", path)?;
                let seed = seed.lines().map(str::trim).find(|line| line.starts_with("SU")).ok_or_else(|| {
                    BusError::Unsupported(format!(
                        "the NKey seed file {} holds no user seed (a line starting with SU)",
                        path.display()
                    ))
                })?;
                options.nkey(seed.to_owned())
            }
            NatsAuth::CredsFile(path) => {
                readable("credentials", path)?;
                // The library's message names the file's defect, never its contents.
                options.credentials_file(path).await.map_err(|e| {
                    BusError::Unsupported(format!("the credentials file {} is not usable: {e}", path.display()))
                })?
            }
        })
    }
}

/// The URL without its `user:password@` part. The client library logs the server addresses it
/// tries at debug level, credentials included, so they are handed over as options instead.
pub(crate) fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Undoes a URL's percent-encoding (`%40` for `@`); anything malformed is kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

fn readable(what: &str, path: &Path) -> Result<(), BusError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| BusError::Unsupported(format!("cannot read the {what} file {}: {e}", path.display())))
}

fn read_bytes(what: &str, path: &Path) -> Result<Vec<u8>, BusError> {
    std::fs::read(path)
        .map_err(|e| BusError::Unsupported(format!("cannot read the {what} file {}: {e}", path.display())))
}

fn read_text(what: &str, path: &Path) -> Result<String, BusError> {
    String::from_utf8(read_bytes(what, path)?)
        .map_err(|_| BusError::Unsupported(format!("the {what} file {} is not text (PEM expected)", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_its_value_in_debug_or_display() {
        let auth = NatsAuth::UserPassword { user: "app".into(), password: Secret::new("hunter2-very-secret") };

        let shown = format!("{auth:?} {}", Secret::new("hunter2-very-secret"));

        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app"), "{shown}");
    }

    #[test]
    fn credentials_in_a_nats_url_are_read_percent_decoded() {
        let servers = ["nats://a:4222", "nats://app:p%40ss@b:4222"];

        let auth = NatsAuth::in_urls(&servers);

        assert_eq!(auth, NatsAuth::UserPassword { user: "app".into(), password: Secret::new("p@ss") });
        assert_eq!(NatsAuth::in_urls(&["nats://s3cret@h:4222"]), NatsAuth::Token(Secret::new("s3cret")));
        assert_eq!(NatsAuth::in_urls(&["nats://h:4222"]), NatsAuth::FromUrl);
        assert_eq!(without_credentials("nats://app:p%40ss@b:4222"), "nats://b:4222");
        assert_eq!(without_credentials("tls://b:4222"), "tls://b:4222");
    }

    #[test]
    fn a_client_certificate_without_its_key_is_refused_with_the_flag_names() {
        let files = TlsFiles { cert: Some("/nonexistent/cert.pem".into()), ..TlsFiles::default() };

        let error = files.check().unwrap_err().to_string();

        assert!(error.contains("--bus-tls-key"), "{error}");
    }

    #[test]
    fn a_missing_ca_file_is_named_in_the_error() {
        let files = TlsFiles { ca: Some("/nonexistent/ca.pem".into()), ..TlsFiles::default() };

        let error = files.check().unwrap_err().to_string();

        assert!(error.contains("CA file /nonexistent/ca.pem"), "{error}");
    }
}
