//! A session's queue: its messages are handled strictly one after another.

use std::sync::Arc;
use std::time::Duration;

use bus::Delivery;
use schemas::SessionId;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::cache::CacheScope;
use crate::{Worker, process};

/// What a session's queue works under: its partition's current ownership.
#[derive(Clone)]
pub(crate) struct Ownership {
    /// The ownership's share of the context cache.
    pub(crate) cache: CacheScope,
    /// Take nothing new; let what is in hand finish.
    pub(crate) stop: CancellationToken,
    /// Abandon what is in hand.
    pub(crate) abort: CancellationToken,
}

pub(crate) async fn run(
    worker: Worker,
    ownership: Ownership,
    session: SessionId,
    mut queue: mpsc::UnboundedReceiver<Delivery>,
    finished: mpsc::UnboundedSender<(SessionId, u64)>,
    permits: Arc<Semaphore>,
) {
    let Ownership { cache, stop, abort } = ownership;
    while let Some(delivery) = queue.recv().await {
        let sequence = delivery.sequence;
        let message_id = match &delivery.message {
            Ok(message) => message.message_id.clone(),
            Err(_) => continue,
        };
        // A message not yet started when shutdown begins goes back to the bus at once, so
        // the next owner of the partition need not wait for it to time out.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => None,
            permit = permits.clone().acquire_owned() => permit.ok(),
        };
        match permit {
            Some(_permit) => process::handle(&worker, &cache, delivery, &stop, &abort).await,
            None if abort.is_cancelled() => {}
            None => {
                if let Err(e) = delivery.acker.retry_after(Duration::ZERO).await {
                    tracing::warn!(event = "settle_failed", session_id = %session, message_id = %message_id, error = %e);
                }
            }
        }
        let _ = finished.send((session.clone(), sequence));
    }
}
