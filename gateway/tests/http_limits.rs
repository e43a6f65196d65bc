//! The limits a public endpoint needs, seen from raw sockets: oversized headers are refused,
//! a client that trickles its headers or its body is disconnected, connections left idle are
//! closed (reply streams are not), connections beyond the limit wait until one closes, while well-behaved clients keep being served throughout; and malformed paths, queries and bodies get the JSON error body.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::MemoryBus;
use chatfleet_gateway::{Gateway, GatewayConfig, HttpLimits};
use schemas::PartitionCount;
use store::EmbeddedStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A gateway on a free port with the given limits, over a memory bus and an embedded store.
struct TestGateway {
    address: std::net::SocketAddr,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    async fn spawn(http: HttpLimits) -> TestGateway {
        Self::spawn_with(GatewayConfig { http, ..GatewayConfig::default() }).await
    }

    async fn spawn_with(config: GatewayConfig) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let bus = Arc::new(MemoryBus::new(PartitionCount::new(4).unwrap()));
        let gateway = Gateway::build(bus, store, config, None).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(gateway.serve(listener, stop.clone().cancelled_owned()));
        TestGateway { address, stop, _dir: dir }
    }

    /// Sends `request` on a new connection and returns the status line of the answer.
    async fn status_of(&self, request: &[u8]) -> String {
        let mut socket = TcpStream::connect(self.address).await.unwrap();
        socket.write_all(request).await.unwrap();
        read_status_line(&mut socket).await
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n";

async fn read_status_line(socket: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buffer))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(read > 0, "the connection closed without an answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or_default().to_owned()
}

/// Reads until the peer closes the connection; returns how long that took.
async fn time_until_closed(socket: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, socket.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the gateway kept the connection open for {limit:?}"),
        }
    }
}

#[tokio::test]
async fn headers_larger_than_the_limit_are_refused_with_431_and_smaller_ones_served() {
    let gateway = TestGateway::spawn(HttpLimits { max_header_bytes: 16 * 1024, ..HttpLimits::default() }).await;
    let big = format!("GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Padding: {}\r\n\r\n", "a".repeat(20 * 1024));
    let fits = format!(
        "GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(8 * 1024)
    );

    let refused = gateway.status_of(big.as_bytes()).await;
    let served = gateway.status_of(fits.as_bytes()).await;

    assert!(refused.contains(" 431 "), "{refused}");
    assert!(served.contains(" 200 "), "{served}");
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_disconnected_while_others_are_served() {
    let gateway =
        TestGateway::spawn(HttpLimits { header_read_timeout: Duration::from_secs(1), ..HttpLimits::default() }).await;
    let mut slow = TcpStream::connect(gateway.address).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n").await.unwrap();
    let dripping = async {
        // One header byte every 200 ms: never a complete head.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    let meanwhile = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        gateway.status_of(HEALTH).await
    };

    let ((), served) = tokio::join!(dripping, meanwhile);
    let closed_after = time_until_closed(&mut slow, Duration::from_secs(5)).await;

    assert!(served.contains(" 200 "), "{served}");
    // The drip ended because the gateway closed the connection, well before its 10 s.
    assert!(closed_after < Duration::from_secs(5));
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let gateway = TestGateway::spawn(HttpLimits { max_connections: 2, ..HttpLimits::default() }).await;
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..2 {
        let mut socket = TcpStream::connect(gateway.address).await.unwrap();
        // A kept-alive connection: answered, then left open.
        socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n").await.unwrap();
        assert!(read_status_line(&mut socket).await.contains(" 200 "));
        idle.push(socket);
    }

    let mut third = TcpStream::connect(gateway.address).await.unwrap();
    third.write_all(HEALTH).await.unwrap();
    let mut buffer = [0u8; 64];
    let while_full = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buffer)).await;
    drop(idle.pop());
    let after_one_closed = read_status_line(&mut third).await;

    assert!(while_full.is_err(), "the third connection was served while both slots were taken");
    assert!(after_one_closed.contains(" 200 "), "{after_one_closed}");
}

#[tokio::test]
async fn idle_connections_are_closed_while_a_quiet_reply_stream_stays_open() {
    // No keep-alive comments within the test: the stream sends nothing at all.
    let gateway = TestGateway::spawn_with(GatewayConfig {
        http: HttpLimits { idle_timeout: Duration::from_secs(1), ..HttpLimits::default() },
        keep_alive: Duration::from_secs(3600),
        ..GatewayConfig::default()
    })
    .await;
    let (_, session) = whole_answer(
        &gateway,
        b"POST /v1/sessions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    let (id, token) = (session["session_id"].as_str().unwrap(), session["token"].as_str().unwrap());
    let mut stream = TcpStream::connect(gateway.address).await.unwrap();
    stream
        .write_all(
            format!("GET /v1/sessions/{id}/events HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let stream_status = read_status_line(&mut stream).await;
    // One connection that never sends a byte, one kept alive after its answer.
    let mut silent = TcpStream::connect(gateway.address).await.unwrap();
    let mut kept = TcpStream::connect(gateway.address).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n").await.unwrap();
    let kept_status = read_status_line(&mut kept).await;

    let (silent_closed, kept_closed) = tokio::join!(
        time_until_closed(&mut silent, Duration::from_secs(10)),
        time_until_closed(&mut kept, Duration::from_secs(10)),
    );
    // By now the stream has been quiet for more than the idle timeout too.
    let mut buffer = [0u8; 1024];
    let stream_after = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buffer)).await;

    assert!(stream_status.contains(" 200 "), "{stream_status}");
    assert!(kept_status.contains(" 200 "), "{kept_status}");
    assert!(silent_closed >= Duration::from_millis(800), "closed before the idle timeout: {silent_closed:?}");
    assert!(kept_closed >= Duration::from_millis(800), "closed before the idle timeout: {kept_closed:?}");
    assert!(stream_after.is_err(), "the quiet reply stream did not stay open: {stream_after:?}");
    assert!(gateway.status_of(HEALTH).await.contains(" 200 "));
}

/// Sends `request` on a new connection and returns the whole answer (the gateway closes the
/// connection after it: every request here says `Connection: close`).
async fn whole_answer(gateway: &TestGateway, request: &[u8]) -> (String, serde_json::Value) {
    let mut socket = TcpStream::connect(gateway.address).await.unwrap();
    socket.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(head.to_lowercase().contains("content-type: application/json"), "{head}");
    let body = serde_json::from_str(body).unwrap_or_else(|_| panic!("not a JSON body: {text}"));
    (head.lines().next().unwrap_or_default().to_owned(), body)
}

#[tokio::test]
async fn a_client_that_trickles_its_body_gets_408_as_json_and_loses_the_connection() {
    let gateway =
        TestGateway::spawn(HttpLimits { body_read_timeout: Duration::from_secs(1), ..HttpLimits::default() }).await;
    let mut slow = TcpStream::connect(gateway.address).await.unwrap();
    slow.write_all(b"POST /v1/sessions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let started = Instant::now();
    let dripping = async {
        // One body byte every 200 ms: 100 bytes would take 20 s.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let meanwhile = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        gateway.status_of(HEALTH).await
    };

    let ((), served) = tokio::join!(dripping, meanwhile);
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);

    assert!(served.contains(" 200 "), "{served}");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "the drip ran on for {:?}", started.elapsed());
}

#[tokio::test]
async fn malformed_paths_and_queries_and_oversized_bodies_get_the_json_error_body() {
    let gateway = TestGateway::spawn(HttpLimits::default()).await;
    let cases: [(&str, &str, &str); 7] = [
        ("GET /v1/sessions/%FF%FE/messages HTTP/1.1", " 404 ", "not_found"),
        ("GET /v1/sessions/a.b/messages HTTP/1.1", " 404 ", "not_found"),
        ("POST /v1/sessions/s_1/messages/%2A/cancel HTTP/1.1", " 404 ", "not_found"),
        ("GET /v1/sessions/s_1/messages?access_token=a&access_token=b HTTP/1.1", " 400 ", "invalid_query"),
        ("GET /v1/sessions/s_1/events?last_event_id=1&last_event_id=2 HTTP/1.1", " 400 ", "invalid_query"),
        ("GET /no/such/thing HTTP/1.1", " 404 ", "not_found"),
        ("PUT /v1/sessions HTTP/1.1", " 405 ", "method_not_allowed"),
    ];
    for (line, status, code) in cases {
        let request = format!("{line}\r\nHost: gateway\r\nConnection: close\r\n\r\n");

        let (status_line, body) = whole_answer(&gateway, request.as_bytes()).await;

        assert!(status_line.contains(status), "{line}: {status_line}");
        assert_eq!(body["error"]["code"], code, "{line}: {body}");
    }
    let (status_line, body) = whole_answer(
        &gateway,
        b"POST /v1/healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Length: 5000000\r\n\r\n",
    )
    .await;
    assert!(status_line.contains(" 413 "), "{status_line}");
    assert_eq!(body["error"]["code"], "payload_too_large");
}
