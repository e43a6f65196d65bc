//! chatfleet's roles, assembled from the library crates: `dev` (everything in one process),
//! `gateway`, `worker` and `mock-llm`. `main` and the tests drive the same [`run`].

pub mod cli;
pub mod dead_letters;
pub mod roles;
pub mod telemetry;
pub mod traces;
pub mod wiring;

use std::future::Future;

use cli::{Cli, Command};

/// Runs the role the command line names until `shutdown` resolves.
pub async fn run(cli: Cli, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    match cli.command {
        None => roles::dev(cli.dev, shutdown).await,
        Some(Command::Dev(args)) => roles::dev(args, shutdown).await,
        Some(Command::Gateway(args)) => roles::gateway(args, shutdown).await,
        Some(Command::Worker(args)) => roles::worker(args, shutdown).await,
        Some(Command::MockLlm(args)) => roles::mock_llm(args, shutdown).await,
        Some(Command::Status(args)) => roles::status(args).await,
        Some(Command::DeadLetters(args)) => dead_letters::run(args).await,
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (how Kubernetes stops a pod).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!(event = "shutdown_signal", "shutting down");
}
