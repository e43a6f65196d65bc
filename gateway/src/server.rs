//! The gateway's HTTP server: the router on hyper, with the limits a public endpoint needs: how
//! large a request's headers may be, how long a client may take to send them (a slow client
//! that trickles its headers holds a connection for nothing), how long a connection may sit idle
//! (one that never sends a request, or nothing after its last answer, holds a file for nothing),
//! and how many connections are open at once (each is a file, and the process may hold at most
//! so many).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
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
    /// How long a connection may go with no request in progress and no byte read or written
    /// before the gateway closes it: one that never sends a request, or sends nothing after
    /// its last answer. A reply stream is a request in progress, however quiet.
    pub idle_timeout: Duration,
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
            // Longer than the 60 s idle timeout of common load balancers, so that the balancer,
            // not the gateway, closes a kept-alive connection between them.
            idle_timeout: Duration::from_secs(75),
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
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched { stream, activity: activity.clone() });
        let service = TowerToHyperService::new(Tracked { router: router.clone(), activity: activity.clone() });
        let connection = builder.serve_connection_with_upgrades(io, service).into_owned();
        let connection = graceful.watch(connection);
        let idle_timeout = limits.idle_timeout;
        tokio::spawn(async move {
            // A client that goes away, or breaks the protocol, ends its connection only; one
            // that stays idle too long has it dropped, which closes the socket (nothing is in
            // progress on it to lose).
            tokio::pin!(connection);
            loop {
                let check = activity.idle_deadline(idle_timeout).unwrap_or_else(|| Instant::now() + idle_timeout);
                tokio::select! {
                    _ = &mut connection => break,
                    () = tokio::time::sleep_until(check) => {
                        if activity.idle_deadline(idle_timeout).is_some_and(|deadline| deadline <= Instant::now()) {
                            telemetry::idle_connection_closed();
                            break;
                        }
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// What one connection is doing, for its idle watchdog: the requests in progress on it, and
/// when a byte last went either way or a request last began or ended.
struct Activity {
    opened: Instant,
    /// Milliseconds from `opened` to the last sign of life.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self { opened: Instant::now(), last: AtomicU64::new(0), in_flight: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        let millis = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(millis, Ordering::Relaxed);
    }

    /// When the connection counts as idle, unless something happens before: `None` while a
    /// request is in progress.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.opened + Duration::from_millis(self.last.load(Ordering::Relaxed)) + timeout)
    }
}

/// Marks a request in progress from the call of the router until its answer's body is
/// finished or dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The time first, so that a watchdog that sees no request in progress sees it too.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router, counting the requests in progress on its connection.
#[derive(Clone)]
struct Tracked {
    router: Router,
    activity: Arc<Activity>,
}

impl<B> tower_service::Service<axum::http::Request<B>> for Tracked
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let in_flight = InFlight::begin(self.activity.clone());
        let answer = tower_service::Service::call(&mut self.router, request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Body::new(Finishing { body, _in_flight: in_flight })))
        })
    }
}

/// An answer's body that ends its request's time in progress when it is done or dropped.
struct Finishing {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Finishing {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket, noting every byte read or written as a sign of life.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
