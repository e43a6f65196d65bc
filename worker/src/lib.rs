//! The worker: consumes session partitions from the bus, answers each session's messages in
//! order with the model, streams the reply back on the session's subject and persists it.
//!
//! Shape: [`Worker::run`] starts one partition runner per partition (`partition.rs`); a
//! runner reads each delivery into a job (`job.rs`) and hands it to its session's queue, where
//! messages are handled one at a time (`session.rs`, `process.rs`, whose reply events go out
//! through `events.rs`), while different sessions run concurrently up to
//! [`WorkerConfig::max_inflight`]. Every delivery ends in one typed decision, carried out in
//! `settle.rs`.
//!
//! Invariants: a session's messages are handled strictly one after another; a delivery is
//! acknowledged only after its outcome (reply or failure) is stored; the worker never speaks
//! HTTP to clients; what the worker caches of a conversation (`cache.rs`) lasts no longer than
//! its ownership of the session's partition.

mod cache;
mod channel;
mod context;
mod events;
mod job;
mod partition;
mod process;
mod retry;
mod session;
mod settle;
pub mod telemetry;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::collections::HashMap;

use bus::{Bus, Membership, OwnershipEvent};
use futures::FutureExt;
use llm::ChatModel;
use schemas::{Partition, SessionId};
use store::{Store, StoredMessage};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use context::ContextSettings;
pub use retry::RetryPolicy;

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's name in logs and metrics.
    pub worker_id: schemas::WorkerId,
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
    /// How long in-flight generations of a partition handed to another worker (rebalancing)
    /// may take to finish before they are abandoned to it.
    pub handover_grace: Duration,
    /// Bytes of recent history kept in memory for the sessions of the partitions this worker
    /// owns, so that their next messages need no history read; 0 disables the cache.
    pub context_cache_bytes: usize,
    /// While more than [`WorkerConfig::delta_batch_above`] generations run at once, the longest
    /// a reply's chunks are held to be published together as one `delta` event (the first
    /// chunk of a reply never waits). Zero publishes every chunk as it comes.
    pub delta_batch: Duration,
    /// The number of generations at once above which deltas are batched.
    pub delta_batch_above: usize,
    /// Generation starts of one message across all workers (the store's count, which survives
    /// hand-overs) before it is given up on and dead-lettered. A replayed message gets as many
    /// again: it is dead-lettered on every start that is a multiple of this plus one.
    pub max_generation_starts: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: schemas::WorkerId::parse(format!("worker-{}", std::process::id())).expect("a valid worker id"),
            context: ContextSettings::default(),
            max_inflight: 4096,
            retry: RetryPolicy::default(),
            progress_interval: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            handover_grace: Duration::from_secs(5),
            context_cache_bytes: 64 * 1024 * 1024,
            delta_batch: Duration::from_millis(100),
            delta_batch_above: 256,
            max_generation_starts: 10,
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
    cache: Arc<cache::ContextCache>,
    /// Generations running now, for [`Worker::delta_batch`].
    generating: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Worker {
    pub fn new(bus: Arc<dyn Bus>, store: Arc<dyn Store>, model: Arc<dyn ChatModel>, config: WorkerConfig) -> Self {
        let cache = Arc::new(cache::ContextCache::new(config.context_cache_bytes));
        Self { bus, store, model, config: Arc::new(config), cache, generating: Arc::default() }
    }

    /// How long a reply's chunks may be held to go out as one event: the configured batch
    /// window while the worker is busier than [`WorkerConfig::delta_batch_above`], else zero.
    fn delta_batch(&self) -> Duration {
        if self.generating.load(Ordering::Relaxed) > self.config.delta_batch_above {
            self.config.delta_batch
        } else {
            Duration::ZERO
        }
    }

    /// The recent history this worker has cached for `session`, if any: while the worker owns
    /// the session's partition it equals what `Store::recent` with the configured history limit
    /// returns. For tests and diagnostics; reading it does not count as a use.
    pub fn cached_history(&self, session: &SessionId) -> Option<Vec<StoredMessage>> {
        self.cache.peek(session)
    }

    /// Joins the deployment and consumes the partitions it is given until `shutdown`
    /// resolves. Then it stops taking messages, lets in-flight generations finish within the
    /// grace period, hands its partitions over and returns. What it could not finish stays
    /// unacknowledged and is answered by the partitions' next owners.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let id = self.config.worker_id.clone();
        tokio::pin!(shutdown);
        let mut membership = tokio::select! {
            membership = self.join() => membership,
            _ = &mut shutdown => return,
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(self.config.max_inflight.max(1)));
        let mut runners: HashMap<Partition, RunnerHandle> = HashMap::new();
        let mut tasks: JoinSet<(Partition, u64)> = JoinSet::new();
        let mut next_generation = 0u64;
        let mut leaving = false;
        tracing::info!(event = "worker_started", worker = %id, bus = %self.bus.describe(), model = %self.model.describe(), "worker started");

        loop {
            tokio::select! {
                _ = &mut shutdown, if !leaving => {
                    leaving = true;
                    tracing::info!(event = "worker_stopping", worker = %id, grace = ?self.config.shutdown_grace, "worker stopping");
                    membership.leave().await;
                }
                event = membership.next() => match event {
                    None => break,
                    Some(OwnershipEvent::Acquired(partition)) => {
                        if let Some(old) = runners.remove(&partition) {
                            old.abort.cancel();
                        }
                        next_generation += 1;
                        let handle = RunnerHandle::new(next_generation);
                        let cache = self.cache.open(partition, next_generation);
                        let runner = partition::Runner::new(
                            self.clone(), partition, cache, permits.clone(), handle.stop.clone(), handle.abort.clone(),
                        );
                        let generation = next_generation;
                        tasks.spawn(async move {
                            // A runner that panics ends like one that finished: the worker hands
                            // the partition over, and its next owner starts it afresh. Ignored,
                            // it would leave the partition owned, its lease renewed, and nobody
                            // consuming it.
                            if let Err(panic) = AssertUnwindSafe(runner.run()).catch_unwind().await {
                                let panic = telemetry::panic_message(panic.as_ref());
                                tracing::error!(event = "partition_runner_panicked", partition = partition.get(), panic, "the partition's runner panicked; handing the partition over");
                                telemetry::runner_panicked();
                            }
                            (partition, generation)
                        });
                        runners.insert(partition, handle);
                        telemetry::owned_partitions(runners.len());
                    }
                    Some(OwnershipEvent::Revoked(partition)) => {
                        if let Some(handle) = runners.get_mut(&partition) {
                            // The next owner may change the partition's conversations: what is
                            // cached of them is stale from here on.
                            self.cache.close(partition, handle.generation);
                            let grace = if leaving { self.config.shutdown_grace } else { self.config.handover_grace };
                            handle.revoke(grace);
                        } else {
                            membership.release(partition).await;
                        }
                    }
                    Some(OwnershipEvent::Lost(partition)) => {
                        if let Some(handle) = runners.get_mut(&partition) {
                            self.cache.close(partition, handle.generation);
                            handle.lost = true;
                            handle.abort.cancel();
                            handle.stop.cancel();
                        }
                    }
                },
                Some(finished) = tasks.join_next() => {
                    // Runners catch their panics, and nothing else ends their tasks before
                    // `tasks.shutdown()` below.
                    let Ok((partition, generation)) = finished else {
                        tracing::error!(event = "partition_runner_failed", error = ?finished.err(), "a partition runner's task failed");
                        continue;
                    };
                    self.cache.close(partition, generation);
                    if runners.get(&partition).is_some_and(|h| h.generation == generation) {
                        let handle = runners.remove(&partition).expect("checked above");
                        telemetry::owned_partitions(runners.len());
                        if !handle.lost {
                            membership.release(partition).await;
                        }
                    }
                }
            }
        }
        tasks.shutdown().await;
        tracing::info!(event = "worker_stopped", worker = %id, "worker stopped");
    }

    /// Joins the deployment, retrying while the bus is unreachable.
    async fn join(&self) -> Box<dyn Membership> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.bus.join(&self.config.worker_id).await {
                Ok(membership) => return membership,
                Err(e) => {
                    tracing::warn!(event = "join_failed", error = %e, retry_in = ?delay, "cannot join the deployment yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// The worker's handle on one partition runner.
struct RunnerHandle {
    generation: u64,
    /// Stop pulling; let what is in hand finish.
    stop: CancellationToken,
    /// Abandon what is in hand.
    abort: CancellationToken,
    /// Ownership ended without a hand-over: nothing to release.
    lost: bool,
    revoked: bool,
}

impl RunnerHandle {
    fn new(generation: u64) -> Self {
        Self {
            generation,
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            lost: false,
            revoked: false,
        }
    }

    /// Starts the hand-over: no new messages; in-flight ones get `grace` to finish, after which
    /// they are abandoned to the next owner.
    fn revoke(&mut self, grace: Duration) {
        if self.revoked {
            return;
        }
        self.revoked = true;
        self.stop.cancel();
        let abort = self.abort.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => abort.cancel(),
                _ = abort.cancelled() => {}
            }
        });
    }
}
