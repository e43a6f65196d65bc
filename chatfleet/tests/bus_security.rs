//! Authenticated, encrypted broker connections as operators configure them: `chatfleet`
//! processes against a nats-server that requires mutual TLS and credentials (password, token,
//! NKey), with certificates made for the test. Wrong credentials and untrusted certificates stop
//! start-up with one line, and no secret ever shows in output, `--help` or metrics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::{NatsServer, TestPki};

const PASSWORD: &str = "pw-Zq81-never-printed";
const TOKEN: &str = "tok-Xk27-never-printed";

/// A child process killed on drop, its stdout and stderr in one file.
struct Proc {
    child: Child,
    output: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chatfleet() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatfleet"));
    command.env("RUST_LOG", "debug").env_remove("CHATFLEET_BUS");
    command
}

fn spawn(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let output = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&output).unwrap();
    let child = chatfleet()
        .args(args)
        .envs(env.iter().copied())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("the binary starts");
    Proc { child, output }
}

/// Runs a role that exits on its own (`status`), with a deadline.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = chatfleet();
    command.args(args).envs(env.iter().copied()).stdin(Stdio::null());
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the binary starts");
    let started = Instant::now();
    let output = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(30), "{args:?} took {:?}", started.elapsed());
    output
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A nats-server requiring TLS with client certificates signed by the test CA, and `extra`.
async fn mtls_server(pki: &TestPki, server_cert: &str, extra: &str) -> NatsServer {
    let tls = format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 5 }}\n",
        path(&pki.cert(server_cert)),
        path(&pki.key_of(server_cert)),
        path(&pki.cert("ca")),
    );
    NatsServer::start_with_config(&format!("{tls}{extra}")).await
}

fn password_authorization() -> String {
    format!("authorization {{ users = [ {{ user: app, password: {PASSWORD:?} }} ] }}")
}

/// The TLS flags of a client holding `client` (a certificate of the test PKI) and trusting `ca`.
fn tls_args(pki: &TestPki, ca: &str, client: &str) -> Vec<String> {
    vec![
        "--bus-tls-ca".into(),
        path(&pki.cert(ca)),
        "--bus-tls-cert".into(),
        path(&pki.cert(client)),
        "--bus-tls-key".into(),
        path(&pki.key_of(client)),
    ]
}

fn status_with(server: &NatsServer, extra: &[String], env: &[(&str, &str)]) -> Output {
    let url = server.url();
    let mut args = vec!["status", "--bus", url.as_str()];
    args.extend(extra.iter().map(String::as_str));
    run(&args, env)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that start-up failed with exactly one line on stderr containing `expected`.
fn assert_one_line_failure(output: &Output, expected: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "exit status; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("chatfleet:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    assert!(lines[0].contains(expected), "{:?} should say {expected:?}", lines[0]);
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

async fn wait_http_ok(http: &reqwest::Client, url: &str, proc: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not answer 200 within 30 s: {}", std::fs::read_to_string(&proc.output).unwrap_or_default());
}

/// Runs a gateway and a worker on `bus` with `tls` flags and `secrets` in their environment,
/// sends a message, and returns the history after the reply (or 30 s) and everything the
/// processes printed, their metrics and `gateway --help` included.
async fn answer_through_fleet(bus: &str, tls: &[String], secrets: &[(&str, &str)]) -> (String, String) {
    let mongo = testkit::MongoServer::start().await;
    let logs = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mock_port = testkit::free_port().to_string();
    let mock_listen = format!("127.0.0.1:{mock_port}");
    let mock = spawn(logs.path(), "mock", &["mock-llm", "--listen", &mock_listen], &[]);
    let model = format!("http://127.0.0.1:{mock_port}/v1");
    wait_http_ok(&http, &format!("{model}/models"), &mock).await;
    let store = mongo.url_for_db("secure");
    let gateway_port = testkit::free_port();
    let gateway_listen = format!("127.0.0.1:{gateway_port}");
    let mut gateway_args = vec!["gateway", "--listen", &gateway_listen, "--bus", bus, "--store", &store];
    gateway_args.extend(tls.iter().map(String::as_str));
    let gateway = spawn(logs.path(), "gateway", &gateway_args, secrets);
    let worker_port = testkit::free_port();
    let worker_listen = format!("127.0.0.1:{worker_port}");
    let mut worker_args = vec![
        "worker",
        "--listen",
        &worker_listen,
        "--bus",
        &bus,
        "--store",
        &store,
        "--llm-base-url",
        &model,
        "--model",
        "mock",
    ];
    worker_args.extend(tls.iter().map(String::as_str));
    let worker = spawn(logs.path(), "worker", &worker_args, secrets);
    let base = format!("http://{gateway_listen}");
    wait_http_ok(&http, &format!("{base}/readyz"), &gateway).await;
    wait_http_ok(&http, &format!("http://{worker_listen}/readyz"), &worker).await;

    // Act: a message goes through the authenticated TLS bus and its reply comes back.
    let created: Value = http.post(format!("{base}/v1/sessions")).send().await.unwrap().json().await.unwrap();
    let (id, token) = (created["session_id"].as_str().unwrap(), created["token"].as_str().unwrap());
    let accepted = http
        .post(format!("{base}/v1/sessions/{id}/messages"))
        .bearer_auth(token)
        .json(&json!({"text": "hello over tls"}))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    let answered = loop {
        let history: Value = http
            .get(format!("{base}/v1/sessions/{id}/messages"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let text = history.to_string();
        if text.contains("\"assistant\"") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let metrics = http.get(format!("http://{worker_listen}/metrics")).send().await.unwrap().text().await.unwrap();
    let gateway_metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let help = run(&["gateway", "--help"], secrets);
    drop((gateway, worker));

    let mut everything = format!("{metrics}\n{gateway_metrics}\n{}{}", text(&help.stdout), text(&help.stderr));
    for name in ["gateway", "worker"] {
        everything.push_str(&std::fs::read_to_string(logs.path().join(format!("{name}.log"))).unwrap());
    }
    (answered, everything)
}

#[tokio::test]
async fn a_fleet_answers_over_a_nats_server_that_requires_mutual_tls_and_a_password_and_never_prints_it() {
    llm::install_crypto_provider();
    let pki = TestPki::generate();
    let nats = mtls_server(&pki, "server", &password_authorization()).await;
    let secrets = [("CHATFLEET_NATS_USER", "app"), ("CHATFLEET_NATS_PASSWORD", PASSWORD)];

    let (answered, everything) = answer_through_fleet(&nats.url(), &tls_args(&pki, "ca", "client"), &secrets).await;

    assert!(answered.contains("\"assistant\""), "no reply within 30 s: {answered}");
    assert!(everything.contains("connected to NATS"), "the logs show the connection");
    assert!(!everything.contains(PASSWORD), "the password leaked:\n{everything}");
}

#[tokio::test]
async fn a_fleet_answers_over_rabbitmq_with_amqps_and_client_certificates_and_never_prints_the_password() {
    llm::install_crypto_provider();
    let pki = TestPki::generate();
    let rabbit = testkit::RabbitMqServer::start_with_tls(&pki, "server").await;

    let (answered, everything) = answer_through_fleet(&rabbit.tls_url(), &tls_args(&pki, "ca", "client"), &[]).await;

    assert!(answered.contains("\"assistant\""), "no reply within 30 s: {answered}");
    assert!(everything.contains("connected to RabbitMQ"), "the logs show the connection");
    assert!(!everything.contains("guest:guest"), "the credentials leaked:\n{everything}");
}

#[tokio::test]
async fn a_wrong_rabbitmq_password_stops_start_up_with_one_line_that_does_not_show_it() {
    let pki = TestPki::generate();
    let rabbit = testkit::RabbitMqServer::start_with_tls(&pki, "server").await;
    let url = rabbit.tls_url().replace("guest:guest", "guest:wrong-Rb7-password");
    let mut args = vec!["status".to_owned(), "--bus".to_owned(), url];
    args.extend(tls_args(&pki, "ca", "client"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let output = run(&args, &[]);

    assert_one_line_failure(&output, "refused the credentials");
    assert!(!text(&output.stderr).contains("wrong-Rb7-password"));
}

#[tokio::test]
async fn a_rabbitmq_certificate_from_an_untrusted_ca_stops_start_up_with_one_line() {
    let pki = TestPki::generate();
    let rabbit = testkit::RabbitMqServer::start_with_tls(&pki, "other-server").await;
    let mut args = vec!["status".to_owned(), "--bus".to_owned(), rabbit.tls_url()];
    args.extend(tls_args(&pki, "ca", "client"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let output = run(&args, &[]);

    assert_one_line_failure(&output, "TLS with RabbitMQ");
}

#[tokio::test]
async fn a_wrong_nats_password_stops_start_up_with_one_line_that_does_not_show_it() {
    let pki = TestPki::generate();
    let nats = mtls_server(&pki, "server", &password_authorization()).await;

    let output = status_with(
        &nats,
        &tls_args(&pki, "ca", "client"),
        &[("CHATFLEET_NATS_USER", "app"), ("CHATFLEET_NATS_PASSWORD", "wrong-Qv5-password")],
    );

    assert_one_line_failure(&output, "refused the credentials");
    assert!(!text(&output.stderr).contains("wrong-Qv5-password"));
}

#[tokio::test]
async fn a_nats_password_in_the_url_works_and_is_shown_redacted() {
    let pki = TestPki::generate();
    let nats = mtls_server(&pki, "server", &password_authorization()).await;
    let url = format!("nats://app:{PASSWORD}@127.0.0.1:{}", nats.port());
    let mut args = vec!["status".to_owned(), "--bus".to_owned(), url];
    args.extend(tls_args(&pki, "ca", "client"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let output = run(&args, &[]);

    assert!(output.status.success(), "{}", text(&output.stderr));
    let all = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(!all.contains(PASSWORD), "{all}");
}

#[tokio::test]
async fn a_server_certificate_from_an_untrusted_ca_stops_start_up_with_one_line() {
    let pki = TestPki::generate();
    let nats = mtls_server(&pki, "other-server", &password_authorization()).await;

    let output = status_with(
        &nats,
        &tls_args(&pki, "ca", "client"),
        &[("CHATFLEET_NATS_USER", "app"), ("CHATFLEET_NATS_PASSWORD", PASSWORD)],
    );

    assert_one_line_failure(&output, "TLS with NATS");
    assert!(!text(&output.stderr).contains(PASSWORD));
}

#[tokio::test]
async fn a_client_certificate_the_server_does_not_trust_stops_start_up_with_one_line() {
    let pki = TestPki::generate();
    let nats = mtls_server(&pki, "server", &password_authorization()).await;

    let output = status_with(
        &nats,
        &tls_args(&pki, "ca", "other-client"),
        &[("CHATFLEET_NATS_USER", "app"), ("CHATFLEET_NATS_PASSWORD", PASSWORD)],
    );

    assert_one_line_failure(&output, "NATS at nats://127.0.0.1");
}

#[tokio::test]
async fn a_nats_token_authenticates_and_a_wrong_one_is_refused() {
    let pki = TestPki::generate();
    let nats = mtls_server(&pki, "server", &format!("authorization {{ token: {TOKEN:?} }}")).await;
    let tls = tls_args(&pki, "ca", "client");

    let good = status_with(&nats, &tls, &[("CHATFLEET_NATS_TOKEN", TOKEN)]);
    let bad = status_with(&nats, &tls, &[("CHATFLEET_NATS_TOKEN", "tok-wrong")]);

    assert!(good.status.success(), "{}", text(&good.stderr));
    assert!(!format!("{}{}", text(&good.stdout), text(&good.stderr)).contains(TOKEN));
    assert_one_line_failure(&bad, "refused the credentials");
}

#[tokio::test]
async fn a_nats_nkey_seed_file_authenticates() {
    let pki = TestPki::generate();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let nats =
        mtls_server(&pki, "server", &format!("authorization {{ users = [ {{ nkey: {:?} }} ] }}", user.public_key()))
            .await;
    let seed_file = pki.dir().join("user.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    let mut args = tls_args(&pki, "ca", "client");
    args.extend(["--nats-nkey".to_owned(), path(&seed_file)]);

    let output = status_with(&nats, &args, &[]);
    let without = status_with(&nats, &tls_args(&pki, "ca", "client"), &[]);

    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(!format!("{}{}", text(&output.stdout), text(&output.stderr)).contains(&seed));
    assert_one_line_failure(&without, "refused the credentials");
}

/// The client certificate and its key in one file, as MongoDB's `tlsCertificateKeyFile` wants.
fn certificate_key_file(pki: &TestPki, client: &str) -> PathBuf {
    let combined = pki.dir().join(format!("{client}-combined.pem"));
    let mut text = std::fs::read_to_string(pki.cert(client)).unwrap();
    text.push_str(&std::fs::read_to_string(pki.key_of(client)).unwrap());
    std::fs::write(&combined, text).unwrap();
    combined
}

#[tokio::test]
async fn the_store_connects_to_a_mongodb_server_that_requires_tls_and_client_certificates_through_url_options() {
    let pki = TestPki::generate();
    let mongo = testkit::MongoServer::start_with_tls(&pki, "server").await;
    let url = mongo.tls_url_for_db("secure", &pki.cert("ca"), &certificate_key_file(&pki, "client"));
    let plain = mongo.url_for_db("secure");

    let connected = store::mongo::MongoStore::connect(&url).await;
    let without_tls = store::mongo::MongoStore::connect(&plain).await;

    assert!(connected.is_ok(), "{:?}", connected.err());
    assert!(without_tls.is_err(), "a plaintext client must not get in");
}

#[tokio::test]
async fn a_mongodb_certificate_from_an_untrusted_ca_is_refused() {
    let pki = TestPki::generate();
    let mongo = testkit::MongoServer::start_with_tls(&pki, "other-server").await;
    let url = mongo.tls_url_for_db("secure", &pki.cert("ca"), &certificate_key_file(&pki, "client"));

    let connected = store::mongo::MongoStore::connect(&url).await;

    let error = connected.err().expect("an untrusted server certificate is refused").to_string();
    assert!(error.contains("127.0.0.1"), "{error}");
}

#[tokio::test]
async fn a_client_certificate_rabbitmq_does_not_trust_stops_start_up_with_one_line() {
    let pki = TestPki::generate();
    let rabbit = testkit::RabbitMqServer::start_with_tls(&pki, "server").await;
    let mut args = vec!["status".to_owned(), "--bus".to_owned(), rabbit.tls_url()];
    args.extend(tls_args(&pki, "ca", "other-client"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let output = run(&args, &[]);

    assert_one_line_failure(&output, "RabbitMQ at amqps://***@127.0.0.1");
}

#[tokio::test]
async fn tls_files_with_a_plain_amqp_url_are_refused_naming_the_scheme() {
    let pki = TestPki::generate();
    let mut args = vec!["status".to_owned(), "--bus".to_owned(), "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()];
    args.extend(tls_args(&pki, "ca", "client"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let output = run(&args, &[]);

    assert_one_line_failure(&output, "must be amqps://");
}
