//! Certificates for the tests of authenticated, encrypted broker connections, made with the
//! `openssl` command in a directory of their own: a CA, a server certificate for 127.0.0.1 and
//! `localhost` and a client certificate it signed, and a second, untrusted CA with a server
//! and a client certificate of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A throwaway public-key infrastructure, removed on drop.
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// Generates every certificate (EC P-256 keys in PKCS#8, valid for a day). Panics, with
    /// openssl's output, if the `openssl` command is missing or fails.
    pub fn generate() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("chatfleet-pki-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for certificates: {e}"));
        let pki = TestPki { dir };
        for ca in ["ca", "other-ca"] {
            pki.key(ca);
            pki.openssl(&[
                "req",
                "-x509",
                "-new",
                "-key",
                &pki.name(ca, "key"),
                "-out",
                &pki.name(ca, "pem"),
                "-days",
                "1",
                "-subj",
                &format!("/CN=chatfleet test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
        }
        pki.leaf("server", "ca", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost");
        pki.leaf("client", "ca", "clientAuth", "subjectAltName=DNS:chatfleet-client");
        pki.leaf("other-server", "other-ca", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost");
        pki.leaf("other-client", "other-ca", "clientAuth", "subjectAltName=DNS:chatfleet-client");
        pki
    }

    /// `<name>.pem`: `ca`, `other-ca`, `server`, `client`, `other-server`, `other-client`.
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pem"))
    }

    /// `<name>.key`, the PKCS#8 private key of [`TestPki::cert`].
    pub fn key_of(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn name(&self, name: &str, ext: &str) -> String {
        self.dir.path().join(format!("{name}.{ext}")).to_string_lossy().into_owned()
    }

    fn key(&self, name: &str) {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &self.name(name, "key"),
        ]);
    }

    fn leaf(&self, name: &str, ca: &str, usage: &str, san: &str) {
        self.key(name);
        let extensions = self.dir.path().join(format!("{name}.ext"));
        std::fs::write(&extensions, format!("{san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", extensions.display()));
        self.openssl(&[
            "req",
            "-new",
            "-key",
            &self.name(name, "key"),
            "-out",
            &self.name(name, "csr"),
            "-subj",
            &format!("/CN=chatfleet test {name}"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &self.name(name, "csr"),
            "-CA",
            &self.name(ca, "pem"),
            "-CAkey",
            &self.name(ca, "key"),
            "-CAcreateserial",
            "-out",
            &self.name(name, "pem"),
            "-days",
            "1",
            "-extfile",
            &extensions.to_string_lossy(),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl").args(args).current_dir(self.dir.path()).output().unwrap_or_else(|e| {
            panic!("the openssl command is needed for the TLS tests (apt-get install openssl): {e}")
        });
        assert!(
            output.status.success(),
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
