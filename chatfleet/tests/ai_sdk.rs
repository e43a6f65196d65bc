//! The AI SDK endpoints (`/v1/ai-sdk/chat`) tested with the Vercel AI SDK's own client code:
//! `node --test` runs `tests/ai-sdk/chat.test.mjs` (`DefaultChatTransport`,
//! `readUIMessageStream`, and `@ai-sdk/react`'s `Chat` class, which runs without rendering)
//! against a fleet started here, on every backend. The npm packages come from the committed
//! `tests/ai-sdk/package-lock.json`; `scripts/test.sh` installs them (`npm ci`).

#[macro_use]
mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{Backend, Options, TestApp};

on_every_backend!(the_ai_sdks_transport_and_chat_class_send_receive_and_resume_replies);

fn ai_sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ai-sdk")
}

async fn the_ai_sdks_transport_and_chat_class_send_receive_and_resume_replies(backend: Backend) {
    let dir = ai_sdk_dir();
    assert!(
        dir.join("node_modules/ai").is_dir() && dir.join("node_modules/@ai-sdk/react").is_dir(),
        "the AI SDK's npm packages are missing: run scripts/test.sh, or `npm ci` in {}",
        dir.display()
    );
    // Replies of 40 tokens 50 ms apart, so that a second chat can join one half-way.
    let options = Options { first_token_ms: 50, token_ms: 50, reply_tokens: 40, ..Options::default() };
    let app = TestApp::spawn_with(backend, options).await;

    let base = app.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .args(["--test", "--test-reporter=spec", "chat.test.mjs"])
            .current_dir(ai_sdk_dir())
            .env("CHATFLEET_BASE_URL", base)
            .output()
            .expect("node runs (scripts/test.sh installs Node.js)")
    })
    .await
    .unwrap();

    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{report}");
    assert!(output.status.success(), "the AI SDK tests failed:\n{report}");
    assert!(report.contains("pass 4"), "all four AI SDK tests ran:\n{report}");
}
