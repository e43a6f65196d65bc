//! The gateway's HTTP server: the router on hyper, with the limits a public endpoint needs: how
//! large a request's headers may be, how long a client may take to send them (a slow client
//! that trickles its headers holds a connection for nothing), and how many connections are open
//! at once (each is a file, and the process may hold at most so many).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// Limits on what a client may make the gateway hold.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// The most bytes of a request line and headers together (HTTP/1: 431 beyond it; HTTP/2:
    /// the header list size the gateway advertises).
    pub max_header_bytes: usize,
    /// How long a client may take to send a request's headers, counted from the first byte
    /// (a connection kept alive between requests waits without this bound).
    pub header_read_timeout: Duration,
    /// Connections open at once; beyond it new ones wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// How long a client may take to send a request's body, from when the gateway starts
    /// reading it (408 `request_timeout` beyond it): the header read timeout ends at the
    /// headers, and a body trickled a byte at a time would otherwise hold the connection.
    pub body_read_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 16_384,
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` until `closing` is cancelled, then lets open connections
/// finish (reply streams end on `closing` too).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpLimits,
    closing: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper refuses a buffer under 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder.http2().timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = closing.cancelled() => break,
        };
        if slots.available_permits() == 0 {
            telemetry::connections_at_limit(limits.max_connections);
        }
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of files, or a connection reset before it was accepted: neither ends
                    // the server; a short pause keeps an exhausted process from spinning.
                    telemetry::accept_failed(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = closing.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that goes away, or breaks the protocol, ends its connection only.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
