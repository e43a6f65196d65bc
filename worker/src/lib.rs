//! The worker: consumes session partitions from the bus, answers each session's messages in
//! order with the model, streams the reply back on the session's subject and persists it.
//!
//! Shape: [`Worker::run`] starts one partition runner per partition (`partition.rs`); a
//! runner hands each delivery to its session's queue, where messages are handled one at a
//! time (`session.rs`, `process.rs`), while different sessions run concurrently up to
//! [`WorkerConfig::max_inflight`].
//!
//! Invariants: a session's messages are handled strictly one after another; a delivery is
//! acknowledged only after its outcome (reply or failure) is stored; the worker never speaks
//! HTTP to clients.

mod context;
mod partition;
mod process;
mod retry;
mod session;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bus::Bus;
use llm::ChatModel;
use store::Store;
use tokio_util::sync::CancellationToken;

pub use context::ContextSettings;
pub use retry::RetryPolicy;

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's name in logs and metrics.
    pub worker_id: String,
    /// What goes into the model's context.
    pub context: ContextSettings,
    /// How many generations may run at once in this worker.
    pub max_inflight: usize,
    /// How transient model errors are retried.
    pub retry: RetryPolicy,
    /// How often a long generation tells the bus it is still in progress.
    pub progress_interval: Duration,
    /// How long in-flight generations may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", std::process::id()),
            context: ContextSettings::default(),
            max_inflight: 512,
            retry: RetryPolicy::default(),
            progress_interval: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Everything a worker works with.
#[derive(Clone)]
pub struct Worker {
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    model: Arc<dyn ChatModel>,
    config: Arc<WorkerConfig>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Worker {
    pub fn new(bus: Arc<dyn Bus>, store: Arc<dyn Store>, model: Arc<dyn ChatModel>, config: WorkerConfig) -> Self {
        Self { bus, store, model, config: Arc::new(config) }
    }

    /// Consumes every partition until `shutdown` resolves, then stops taking messages, lets
    /// in-flight generations finish within the grace period and returns. Whatever was not
    /// finished stays unacknowledged and is delivered again.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let stop = CancellationToken::new();
        let permits = Arc::new(tokio::sync::Semaphore::new(self.config.max_inflight.max(1)));
        let mut runners = tokio::task::JoinSet::new();
        for partition in self.bus.partitions().all() {
            let runner = partition::Runner::new(self.clone(), partition, permits.clone(), stop.clone());
            runners.spawn(runner.run());
        }
        tracing::info!(
            event = "worker_started",
            worker = %self.config.worker_id,
            partitions = self.bus.partitions().get(),
            bus = %self.bus.describe(),
            model = %self.model.describe(),
            "worker started"
        );
        shutdown.await;
        tracing::info!(event = "worker_stopping", worker = %self.config.worker_id, grace = ?self.config.shutdown_grace, "worker stopping");
        stop.cancel();
        let drained =
            tokio::time::timeout(self.config.shutdown_grace, async { while runners.join_next().await.is_some() {} })
                .await;
        if drained.is_err() {
            tracing::warn!(event = "worker_grace_expired", worker = %self.config.worker_id, "grace period over; unfinished messages will be redelivered");
            runners.abort_all();
        }
        tracing::info!(event = "worker_stopped", worker = %self.config.worker_id, "worker stopped");
    }
}
