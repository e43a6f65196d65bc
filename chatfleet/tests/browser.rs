//! The chat page (gateway/static/index.html) in a real browser: headless Chromium (Debian's
//! `chromium` package) driven by Playwright for Python, which `tests/browser/page_test.py`
//! uses against a fleet started here. The cases: a message is sent and its reply streams in;
//! Stop (the button and Escape) cancels a reply; a reload mid-reply and a gateway restarted
//! mid-reply both end with the whole reply shown once; HTML in a message or a reply shows as
//! text and runs nothing; Markdown renders (lists, code, links); past conversations reopen.
//!
//! `chatfleet dev` is one process whose bus lives in memory, so restarting its gateway restarts
//! everything with it; the gateway-restart case runs on NATS, where a gateway restarts alone.

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::{Backend, Options, TestApp, test_python};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The cases every backend runs.
const CASES: &str = "send,stop,reload,html,markdown,conversations";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_streams_stops_survives_a_reload_and_shows_markdown_and_html_safely_on_dev() {
    run_page_test(Backend::Dev, CASES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_streams_stops_survives_a_reload_and_a_gateway_restart_and_shows_markdown_and_html_safely_on_nats()
{
    run_page_test(Backend::NatsMongo, &format!("{CASES},gateway_restart")).await;
}

/// Replies of 60 words 60 ms apart: long enough to stop, reload or restart a gateway mid-way.
fn slow_replies() -> Options {
    Options { first_token_ms: 50, token_ms: 60, reply_tokens: 60, ..Options::default() }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/page_test.py")
}

async fn run_page_test(backend: Backend, cases: &str) {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's `chromium` package (scripts/test.sh does)"
    );
    let python = test_python("playwright");
    let mut app = TestApp::spawn_with(backend, slow_replies()).await;
    let mut child = tokio::process::Command::new(python)
        .arg(script())
        .args(["--base", &app.base, "--chromium", CHROMIUM, "--cases", cases])
        .args(
            std::env::var("CHATFLEET_PAGE_SCREENSHOT").map(|p| vec!["--screenshot".to_owned(), p]).unwrap_or_default(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the test Python starts");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let stderr = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });

    // The script asks for the gateway to be stopped and started; everything else is its report.
    let mut report = String::new();
    let reading = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            let base = app.base.clone();
            match line.as_str() {
                "STOP_GATEWAY" => app.stop_gateway(&base).await,
                "START_GATEWAY" => app.restart_gateway(&base).await,
                _ => {
                    report.push_str(&line);
                    report.push('\n');
                    continue;
                }
            }
            stdin.write_all(b"done\n").await.unwrap();
            stdin.flush().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(240), reading).await.expect("the browser cases ended within 4 minutes");
    let status = child.wait().await.unwrap();
    let stderr = stderr.await.unwrap();

    println!("{report}");
    assert!(status.success(), "the browser cases failed:\n{report}\n{stderr}");
    for case in cases.split(',') {
        assert!(report.lines().any(|l| l == format!("PASS {case}")), "the case {case} passed:\n{report}\n{stderr}");
    }
}
