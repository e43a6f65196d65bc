//! The four roles. Each builds its parts from settings, serves until shutdown, and stops in
//! order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gateway::{Gateway, GatewayConfig, HttpLimits};
use llm::ChatModel;
use schemas::{PartitionCount, WorkerId};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use worker::{ContextSettings, RetryPolicy, Worker, WorkerConfig};

use crate::cli::{DevArgs, GatewayArgs, GatewayTuning, MockLlmArgs, StatusArgs, WorkerArgs, WorkerTuning};
use crate::wiring::{self, BusChoice};

/// Binds a listener with a deep accept queue: a burst of thousands of users connecting at
/// once would overflow tokio's default backlog of 1024 and some would time out unserved.
async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(8192)
    };
    listen().with_context(|| format!("--listen / CHATFLEET_LISTEN: cannot listen on {addr}"))
}

fn partitions(n: u32) -> anyhow::Result<PartitionCount> {
    PartitionCount::new(n).map_err(|e| anyhow::anyhow!("--partitions / CHATFLEET_PARTITIONS: {e}"))
}

/// Fans one shutdown future out to every part of the process.
fn shutdown_token(shutdown: impl Future<Output = ()> + Send + 'static) -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    token
}

fn lease_settings(seconds: f64) -> anyhow::Result<bus::OwnershipSettings> {
    if !(0.6..=600.0).contains(&seconds) {
        anyhow::bail!("--lease-ttl / CHATFLEET_LEASE_TTL: {seconds} is outside 0.6 to 600 seconds");
    }
    Ok(bus::OwnershipSettings::with_lease_ttl(Duration::from_secs_f64(seconds)))
}

fn worker_config(worker_id: WorkerId, tuning: &WorkerTuning) -> WorkerConfig {
    WorkerConfig {
        worker_id,
        context: ContextSettings {
            system_prompt: tuning.system_prompt.clone(),
            token_budget: tuning.context_tokens,
            ..ContextSettings::default()
        },
        max_inflight: tuning.max_inflight,
        retry: RetryPolicy { max_attempts: tuning.llm_max_attempts, ..RetryPolicy::default() },
        shutdown_grace: Duration::from_secs(tuning.shutdown_grace),
        handover_grace: Duration::from_secs(tuning.handover_grace),
        max_generation_starts: tuning.max_generation_starts,
        context_cache_bytes: tuning.context_cache_mb.saturating_mul(1024 * 1024),
        delta_batch: Duration::from_millis(tuning.delta_batch_ms),
        ..WorkerConfig::default()
    }
}

fn gateway_config(tuning: &GatewayTuning) -> anyhow::Result<GatewayConfig> {
    let channels = match &tuning.channels {
        Some(path) => {
            gateway::channels::load(path).map_err(|e| anyhow::anyhow!("--channels / CHATFLEET_CHANNELS: {e}"))?
        }
        None => gateway::channels::ChannelsConfig::default(),
    };
    let flag_keys: Vec<String> =
        tuning.api_keys.iter().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect();
    let api_keys = gateway::KeyRing::load(&flag_keys, tuning.api_keys_file.as_deref())
        .map_err(|e| anyhow::anyhow!("--api-keys-file / CHATFLEET_API_KEYS_FILE: {e}"))?;
    let previous_token_keys = tuning
        .previous_token_keys
        .iter()
        .filter(|k| !k.trim().is_empty())
        .map(|k| parse_previous_token_key(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !previous_token_keys.is_empty() && tuning.token_key.is_none() {
        anyhow::bail!(
            "--previous-token-key / CHATFLEET_PREVIOUS_TOKEN_KEYS needs --token-key (the key that replaces them)"
        );
    }
    Ok(GatewayConfig {
        api_keys,
        token_key: tuning.token_key.as_ref().map(|k| k.as_bytes().to_vec()),
        previous_token_keys,
        keep_alive: Duration::from_secs(tuning.sse_keep_alive),
        double_texting: tuning.double_texting,
        session_cache_ttl: Duration::from_millis(tuning.session_cache_ms),
        reply_check: Duration::from_secs(tuning.reply_check_secs),
        http: HttpLimits {
            max_header_bytes: tuning.max_header_bytes as usize,
            header_read_timeout: Duration::from_secs(tuning.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(tuning.idle_connection_timeout_secs),
            max_connections: tuning.max_connections as usize,
            body_read_timeout: Duration::from_secs(tuning.body_read_timeout_secs),
        },
        channels,
        ..GatewayConfig::default()
    })
}

/// A `--previous-token-key`: KEY@DEADLINE, the deadline in RFC 3339. The error never shows
/// the key.
fn parse_previous_token_key(value: &str) -> anyhow::Result<(Vec<u8>, time::OffsetDateTime)> {
    let (key, deadline) = value.trim().rsplit_once('@').ok_or_else(|| {
        anyhow::anyhow!(
            "--previous-token-key / CHATFLEET_PREVIOUS_TOKEN_KEYS: expected KEY@DEADLINE (RFC 3339), got no '@'"
        )
    })?;
    let deadline = time::OffsetDateTime::parse(deadline, &time::format_description::well_known::Rfc3339).map_err(|e| {
        anyhow::anyhow!("--previous-token-key / CHATFLEET_PREVIOUS_TOKEN_KEYS: the deadline {deadline:?} is not an RFC 3339 time ({e})")
    })?;
    if key.is_empty() {
        anyhow::bail!("--previous-token-key / CHATFLEET_PREVIOUS_TOKEN_KEYS: the key before '@' is empty");
    }
    Ok((key.as_bytes().to_vec(), deadline))
}

/// This worker's default id: the host name (in the characters an id may hold) and the process id.
fn default_worker_id() -> WorkerId {
    let name = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| "worker".into());
    let host = WorkerId::from_host_name(&name);
    WorkerId::parse(format!("{host}-{}", std::process::id())).unwrap_or(host)
}

/// `chatfleet dev`: gateway, workers, bus and store in one process.
pub async fn dev(args: DevArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    llm::openai::install_crypto_provider();
    let partitions = partitions(args.partitions.partitions)?;
    let gateway_settings = gateway_config(&args.gateway)?;
    let bus_choice = wiring::parse_bus(&args.bus)?;
    let model: Arc<dyn ChatModel> = match wiring::connect_model(&args.model)? {
        Some(model) => model,
        None => {
            println!(
                "chatfleet: no model configured, so replies come from the built-in stand-in model (it echoes your message); \
                 set OPENAI_BASE_URL, OPENAI_API_KEY and CHATFLEET_MODEL (or --llm-base-url, --llm-api-key, --model) to use a real one"
            );
            Arc::new(llm::stand_in::StandInModel::new(llm::mock_reply::MockSettings::default()))
        }
    };
    let store = wiring::connect_store(&args.store, true).await?;
    if !wiring::is_mongodb(&args.store) {
        let shown = std::path::absolute(&args.store).unwrap_or_else(|_| args.store.clone().into());
        println!("chatfleet: conversations are kept in {}", shown.display());
    }
    let bus = wiring::connect_bus(
        bus_choice,
        partitions,
        "chatfleet-dev",
        lease_settings(args.worker.lease_ttl)?,
        &args.nats,
        &args.bus_security,
    )
    .await?;
    let listener = bind(args.listen).await?;
    let address = listener.local_addr()?;

    let stop = shutdown_token(shutdown);
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..args.workers.max(1) {
        let id = WorkerId::parse(format!("dev-worker-{i}")).expect("a dev worker id is valid");
        let config = worker_config(id, &args.worker);
        let worker = Worker::new(bus.clone(), store.clone(), model.clone(), config);
        workers.spawn(worker.run(stop.clone().cancelled_owned()));
    }
    let gateway = Gateway::build(bus, store, gateway_settings, crate::telemetry::metrics())
        .await
        .context("cannot prepare the gateway")?;
    println!("chatfleet: ready; open http://{address}");
    tracing::info!(event = "dev_started", listen = %address, model = %model.describe());
    gateway.serve(listener, stop.clone().cancelled_owned()).await?;
    while workers.join_next().await.is_some() {}
    Ok(())
}

/// `chatfleet gateway`.
pub async fn gateway(args: GatewayArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    // Channel deliveries call HTTPS endpoints.
    llm::openai::install_crypto_provider();
    let partitions = partitions(args.partitions.partitions)?;
    let gateway_settings = gateway_config(&args.gateway)?;
    let bus_choice = match wiring::parse_bus(&args.bus)? {
        BusChoice::Memory => {
            anyhow::bail!(
                "--bus / CHATFLEET_BUS: memory: works only with `chatfleet dev`; use nats://host:4222 or amqp://host:5672"
            )
        }
        other => other,
    };
    let store = wiring::connect_store(&args.store, false).await?;
    let bus = wiring::connect_bus(
        bus_choice,
        partitions,
        "chatfleet-gateway",
        bus::OwnershipSettings::default(),
        &args.nats,
        &args.bus_security,
    )
    .await?;
    let listener = bind(args.listen).await?;
    let address = listener.local_addr()?;
    let described = bus.describe();
    let gateway = Gateway::build(bus, store, gateway_settings, crate::telemetry::metrics())
        .await
        .context("--store / CHATFLEET_STORE: cannot load the session token key")?;
    tracing::info!(event = "gateway_started", listen = %address, bus = %described, "gateway listening on http://{address}");
    gateway.serve(listener, shutdown).await?;
    Ok(())
}

/// `chatfleet worker`.
pub async fn worker(args: WorkerArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    llm::openai::install_crypto_provider();
    let partitions = partitions(args.partitions.partitions)?;
    let bus_choice = match wiring::parse_bus(&args.bus)? {
        BusChoice::Memory => {
            anyhow::bail!(
                "--bus / CHATFLEET_BUS: memory: works only with `chatfleet dev`; use nats://host:4222 or amqp://host:5672"
            )
        }
        other => other,
    };
    let model = wiring::connect_model(&args.model)?.ok_or_else(|| {
        anyhow::anyhow!(
            "--llm-base-url / OPENAI_BASE_URL is required for a worker: the base URL of an OpenAI-compatible endpoint \
             (for a local stand-in, run `chatfleet mock-llm` and use http://127.0.0.1:8080/v1)"
        )
    })?;
    let store = wiring::connect_store(&args.store, false).await?;
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let ownership = lease_settings(args.worker.lease_ttl)?;
    let bus = wiring::connect_bus(
        bus_choice,
        partitions,
        &format!("chatfleet-worker-{worker_id}"),
        ownership,
        &args.nats,
        &args.bus_security,
    )
    .await?;
    let listener = bind(args.listen).await?;
    let address = listener.local_addr()?;

    let stop = shutdown_token(shutdown);
    // The gateway's own /healthz, /readyz and /metrics: one implementation for both roles.
    let ops: axum::Router = gateway::health::router(gateway::health::Health {
        bus: bus.clone(),
        store: store.clone(),
        readiness_timeout: GatewayConfig::default().readiness_timeout,
        metrics: crate::telemetry::metrics(),
    });
    let ops_stop = stop.clone();
    let ops_server =
        tokio::spawn(
            async move { axum::serve(listener, ops).with_graceful_shutdown(ops_stop.cancelled_owned()).await },
        );
    tracing::info!(event = "worker_ops_listening", listen = %address, "health and metrics on http://{address}");
    let worker = Worker::new(bus, store, model, worker_config(worker_id, &args.worker));
    worker.run(stop.clone().cancelled_owned()).await;
    stop.cancel();
    let _ = ops_server.await;
    Ok(())
}

/// `chatfleet mock-llm`.
pub async fn mock_llm(args: MockLlmArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let listener = bind(args.listen).await?;
    let address = listener.local_addr()?;
    if let Some(upstream) = args.upstream {
        if !(upstream.starts_with("http://") || upstream.starts_with("https://")) {
            anyhow::bail!("--upstream: {upstream:?} is not an http(s) URL");
        }
        // As patient as a worker by default (`--llm-timeout`).
        let timeout = Duration::from_secs(60);
        let model = llm::openai::OpenAiModel::new(llm::openai::OpenAiSettings {
            base_url: upstream,
            api_key: None,
            model: args.model.clone(),
            first_token_timeout: timeout,
            idle_timeout: timeout,
            max_tokens: None,
        })
        .map_err(|e| anyhow::anyhow!("--upstream: {e}"))?;
        println!("chatfleet mock-llm: relaying to {} at http://{address}/v1", model.describe());
        llm::relay::serve(listener, model, args.model, shutdown).await?;
        return Ok(());
    }
    let config = llm::mock_server::MockServerConfig {
        settings: llm::mock_reply::MockSettings {
            first_token_delay: Duration::from_millis(args.first_token_ms),
            token_delay: Duration::from_millis(args.token_ms),
            reply_tokens: args.reply_tokens,
            echo_chars: args.echo_chars,
        },
        model: args.model,
    };
    println!("chatfleet mock-llm: OpenAI-compatible API at http://{address}/v1");
    llm::mock_server::serve(listener, config, shutdown).await?;
    Ok(())
}

/// `chatfleet status`: prints who owns which partition.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let partitions = partitions(args.partitions.partitions)?;
    let bus_choice = match wiring::parse_bus(&args.bus)? {
        BusChoice::Memory => anyhow::bail!(
            "--bus / CHATFLEET_BUS: status needs a broker URL such as nats://host:4222 or amqp://host:5672"
        ),
        other => other,
    };
    let bus = wiring::connect_bus(
        bus_choice,
        partitions,
        "chatfleet-status",
        bus::OwnershipSettings::default(),
        &args.nats,
        &args.bus_security,
    )
    .await?;
    let status = bus.status().await.context("cannot read the ownership state")?;
    let deliveries = bus.delivery_status().await.ok();
    // A closed stdout (`chatfleet status | head`) ends the listing quietly.
    match print_status(&status, deliveries.as_ref(), args.json) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn print_status(
    status: &bus::FleetStatus,
    deliveries: Option<&bus::DeliveryQueueStatus>,
    json: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        let mut value = serde_json::to_value(status).map_err(std::io::Error::other)?;
        if let (Some(deliveries), Some(object)) = (deliveries, value.as_object_mut()) {
            object.insert("channel_deliveries".into(), serde_json::json!(deliveries));
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&value).map_err(std::io::Error::other)?)?;
        return Ok(());
    }
    writeln!(out, "workers: {}", status.workers.len())?;
    for w in &status.workers {
        let owned = status.partitions.iter().filter(|p| p.owner.as_deref() == Some(w.worker.as_str())).count();
        writeln!(out, "  {:<40} {:>3} partitions   seen {:.1}s ago", w.worker, owned, w.seen_secs_ago)?;
    }
    writeln!(out)?;
    writeln!(out, "{:>9}  {:<40} {:>8} {:>9} {:>9}", "partition", "owner", "fence", "pending", "in-flight")?;
    let show = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for p in &status.partitions {
        writeln!(
            out,
            "{:>9}  {:<40} {:>8} {:>9} {:>9}",
            p.partition,
            p.owner.as_deref().unwrap_or("(none)"),
            show(p.fence),
            show(p.pending),
            show(p.in_flight)
        )?;
    }
    // A partition without a live owner is one whose users are waiting: say so, not only "(none)".
    let live = |owner: &str| status.workers.iter().any(|w| w.worker == owner);
    let unowned: Vec<String> = status
        .partitions
        .iter()
        .filter(|p| !p.owner.as_deref().is_some_and(live))
        .map(|p| p.partition.to_string())
        .collect();
    if !unowned.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "unowned: {} of {} partitions have no live owner ({}); their messages wait until a worker takes them",
            unowned.len(),
            status.partitions.len(),
            unowned.join(", ")
        )?;
    }
    if let Some(dead) = status.dead_letters {
        writeln!(out)?;
        writeln!(out, "dead letters: {dead} (messages given up on; see `chatfleet dead-letters list`)")?;
    }
    if let Some(deliveries) = deliveries {
        writeln!(out)?;
        writeln!(
            out,
            "channel deliveries: {} pending, {} undeliverable (replies given up on after their last attempt)",
            deliveries.pending, deliveries.undeliverable
        )?;
    }
    Ok(())
}
