//! The command line (`../shared/operator-interface.md`). Every flag can also be given as the
//! environment variable named beside it; flags win.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use schemas::DoubleTexting;

/// chatfleet serves a chatbot to many users at once: a stateless HTTP gateway publishes user
/// messages to a message bus partitioned by session, a pool of workers answers each session in
/// order with a language model, and replies stream back as they are generated.
///
/// With no command, `chatfleet` runs `dev`: everything in one process on embedded defaults,
/// with a chat page at http://127.0.0.1:8080.
#[derive(Debug, Parser)]
#[command(name = "chatfleet", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub dev: DevArgs,
}

impl Cli {
    /// The role's name, as in `chatfleet-<role>`, the default service name of its traces.
    pub fn role(&self) -> &'static str {
        match &self.command {
            None | Some(Command::Dev(_)) => "dev",
            Some(Command::Gateway(_)) => "gateway",
            Some(Command::Worker(_)) => "worker",
            Some(Command::MockLlm(_)) => "mock-llm",
            Some(Command::Status(_)) => "status",
            Some(Command::DeadLetters(_)) => "dead-letters",
        }
    }

    pub fn log_format(&self) -> LogFormat {
        match &self.command {
            None => self.dev.log.log_format,
            Some(Command::Dev(a)) => a.log.log_format,
            Some(Command::Gateway(a)) => a.log.log_format,
            Some(Command::Worker(a)) => a.log.log_format,
            Some(Command::MockLlm(a)) => a.log.log_format,
            Some(Command::Status(a)) => a.log.log_format,
            Some(Command::DeadLetters(a)) => a.log_format(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything in one process: gateway, worker pool, in-process bus, embedded store (the
    /// default command).
    Dev(DevArgs),
    /// The HTTP gateway only: stateless, run as many as needed.
    Gateway(GatewayArgs),
    /// One worker process: consumes partitions, generates replies, streams them back.
    Worker(WorkerArgs),
    /// A local OpenAI-compatible chat-completions server for demos, tests and load tests.
    MockLlm(MockLlmArgs),
    /// Which worker owns which partition, with each partition's backlog and in-flight count.
    Status(StatusArgs),
    /// Lists or replays the user messages the fleet gave up on (`list`, `replay`).
    #[command(subcommand_required = true)]
    DeadLetters(crate::dead_letters::DeadLettersArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format. Verbosity follows RUST_LOG (default: info).
    #[arg(long, env = "CHATFLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct PartitionArgs {
    /// Number of session partitions; fixed for a deployment, the same on every gateway and
    /// worker.
    #[arg(long, env = "CHATFLEET_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub partitions: u32,
}

#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// Copies of each JetStream stream chatfleet creates on NATS (the input stream and the
    /// ownership bucket): `auto` (3, or fewer when the cluster has fewer servers; 1 on a single
    /// server) or 1 to 5. An existing stream is changed to an explicit count; `auto` raises it,
    /// never lowers it.
    #[arg(long, env = "CHATFLEET_NATS_REPLICAS", default_value_t = bus::Replicas::Auto, value_parser = parse_replicas)]
    pub nats_replicas: bus::Replicas,

    /// Seconds reply events stay resumable (`Last-Event-ID`), on every bus: in the JetStream
    /// stream `CHATFLEET_OUT`, RabbitMQ's stream queue `chatfleet.out.log` (fixed when first
    /// declared) or `dev`'s memory. Unset: 600 for a new stream, an existing one keeps its own.
    #[arg(long, env = "CHATFLEET_EVENT_RETENTION_SECS", value_parser = clap::value_parser!(u64).range(1..=7 * 24 * 3600))]
    pub event_retention_secs: Option<u64>,
}

/// How processes prove themselves to the broker and check its certificate. Secrets are best
/// given as environment variables: command lines are visible to every user of the machine.
#[derive(Debug, Clone, Default, Args)]
pub struct BusSecurityArgs {
    /// A CA certificate file (PEM) to trust for the broker's certificate, besides the system's.
    /// Setting any --bus-tls-* file makes TLS required (NATS), or needs an amqps:// URL (RabbitMQ).
    #[arg(long, help_heading = "Bus security", env = "CHATFLEET_BUS_TLS_CA", value_name = "PEM")]
    pub bus_tls_ca: Option<PathBuf>,

    /// This process's client certificate (PEM), for brokers that verify clients (mutual TLS).
    #[arg(
        long,
        help_heading = "Bus security",
        env = "CHATFLEET_BUS_TLS_CERT",
        value_name = "PEM",
        requires = "bus_tls_key"
    )]
    pub bus_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --bus-tls-cert.
    #[arg(
        long,
        help_heading = "Bus security",
        env = "CHATFLEET_BUS_TLS_KEY",
        value_name = "PEM",
        requires = "bus_tls_cert"
    )]
    pub bus_tls_key: Option<PathBuf>,

    /// NATS user name (with --nats-password). Credentials in the URL
    /// (nats://user:password@host, nats://token@host) work too.
    #[arg(long, help_heading = "Bus security", env = "CHATFLEET_NATS_USER", requires = "nats_password", conflicts_with_all = ["nats_token", "nats_nkey", "nats_creds"])]
    pub nats_user: Option<String>,

    /// NATS password of --nats-user; never logged.
    #[arg(long, help_heading = "Bus security", env = "CHATFLEET_NATS_PASSWORD", hide_env_values = true, requires = "nats_user", value_parser = parse_secret)]
    pub nats_password: Option<bus::Secret>,

    /// NATS authentication token; never logged.
    #[arg(long, help_heading = "Bus security", env = "CHATFLEET_NATS_TOKEN", hide_env_values = true, conflicts_with_all = ["nats_nkey", "nats_creds"], value_parser = parse_secret)]
    pub nats_token: Option<bus::Secret>,

    /// A file holding a NATS user NKey seed (SU...), for servers that list the user's public key.
    #[arg(
        long,
        help_heading = "Bus security",
        env = "CHATFLEET_NATS_NKEY",
        value_name = "FILE",
        conflicts_with = "nats_creds"
    )]
    pub nats_nkey: Option<PathBuf>,

    /// A NATS `.creds` file (user JWT and NKey seed), for servers in operator (JWT) mode.
    #[arg(long, help_heading = "Bus security", env = "CHATFLEET_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
}

impl BusSecurityArgs {
    pub fn tls(&self) -> bus::TlsFiles {
        bus::TlsFiles { ca: self.bus_tls_ca.clone(), cert: self.bus_tls_cert.clone(), key: self.bus_tls_key.clone() }
    }

    pub fn nats_auth(&self) -> bus::NatsAuth {
        if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            bus::NatsAuth::UserPassword { user: user.clone(), password: password.clone() }
        } else if let Some(token) = &self.nats_token {
            bus::NatsAuth::Token(token.clone())
        } else if let Some(path) = &self.nats_nkey {
            bus::NatsAuth::NKeySeedFile(path.clone())
        } else if let Some(path) = &self.nats_creds {
            bus::NatsAuth::CredsFile(path.clone())
        } else {
            bus::NatsAuth::FromUrl
        }
    }

    /// True when NATS-only settings are given, which a RabbitMQ bus would silently ignore.
    pub fn names_nats_credentials(&self) -> bool {
        self.nats_auth() != bus::NatsAuth::FromUrl
    }
}

/// Wraps a password or token so that it never prints.
fn parse_secret(text: &str) -> Result<bus::Secret, String> {
    Ok(bus::Secret::new(text))
}

/// Parses a replica count, with the message naming the valid ones.
fn parse_replicas(text: &str) -> Result<bus::Replicas, String> {
    text.parse()
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Base URL of any OpenAI-compatible endpoint (OpenAI, Azure OpenAI, vLLM, Ollama,
    /// llama.cpp server, `chatfleet mock-llm`), e.g. https://api.openai.com/v1.
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub llm_base_url: Option<String>,

    /// The endpoint's API key; never logged.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub llm_api_key: Option<String>,

    /// Model name sent to the endpoint.
    #[arg(long, env = "CHATFLEET_MODEL", default_value = "gpt-4o-mini")]
    pub model: String,

    /// Seconds to wait for the model's first token, and at most between two tokens, before
    /// the attempt counts as failed and is retried.
    #[arg(long, env = "CHATFLEET_LLM_TIMEOUT", default_value_t = 60)]
    pub llm_timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerTuning {
    /// System prompt sent at the start of every conversation.
    #[arg(long, env = "CHATFLEET_SYSTEM_PROMPT", default_value = "You are a helpful assistant.")]
    pub system_prompt: String,

    /// Estimated tokens of context (system prompt plus the most recent messages that fit).
    #[arg(long, env = "CHATFLEET_CONTEXT_TOKENS", default_value_t = 3000)]
    pub context_tokens: usize,

    /// Generations one worker runs at the same time (across all its sessions); later messages
    /// wait for a slot. Each holds one connection to the model, so keep it well under the
    /// process's open-files limit (`ulimit -n`), and under what the model's server accepts.
    #[arg(long, env = "CHATFLEET_MAX_INFLIGHT", default_value_t = 4096)]
    pub max_inflight: usize,

    /// Model attempts per message, the first included, before the user gets an error event.
    #[arg(long, env = "CHATFLEET_LLM_MAX_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub llm_max_attempts: u32,

    /// Seconds in-flight generations may take to finish after SIGTERM.
    #[arg(long, env = "CHATFLEET_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,

    /// Seconds the generations of a partition moving to another worker (rebalancing) may take
    /// to finish before the new owner restarts them.
    #[arg(long, env = "CHATFLEET_HANDOVER_GRACE", default_value_t = 5)]
    pub handover_grace: u64,

    /// Generation starts of one message, across all workers, before it is given up on: its
    /// session gets an `error` event (`message_dead_lettered`) and the message goes to the dead
    /// letters (`chatfleet dead-letters`). A replayed message gets as many starts again.
    #[arg(long, env = "CHATFLEET_MAX_GENERATION_STARTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_generation_starts: u32,

    /// Seconds after which a silent worker counts as dead and its partitions move (crash
    /// failover time). Every worker of a deployment should use the same value.
    #[arg(long, env = "CHATFLEET_LEASE_TTL", default_value_t = 3.0)]
    pub lease_ttl: f64,

    /// Megabytes of recent conversation history a worker keeps in memory for the sessions of
    /// the partitions it owns, so that their next messages need no history read; 0 disables it.
    #[arg(long, env = "CHATFLEET_CONTEXT_CACHE_MB", default_value_t = 64)]
    pub context_cache_mb: usize,

    /// Under load (more than 256 generations at once in this worker), the longest a reply's
    /// model chunks are held to go out together as one `delta` event, in milliseconds: fewer,
    /// larger events cost the worker, bus and gateway less per token. The first chunk of a
    /// reply always goes out at once. 0 sends every chunk as it comes.
    #[arg(long, env = "CHATFLEET_DELTA_BATCH_MS", default_value_t = 100)]
    pub delta_batch_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct GatewayTuning {
    /// An API key allowed to create sessions (repeatable). None: anyone may.
    #[arg(long = "api-key", env = "CHATFLEET_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,

    /// A TOML file of API keys (by their SHA-256, never in the clear) with each key's limits:
    /// messages per minute, open reply streams, sessions and model tokens per day, for the key
    /// and for each end user of it, and a session's own messages per minute (README,
    /// "API keys and limits"). Read again within a second or two of every change, so keys are
    /// added, revoked and limits changed without a restart. Limits hold across every gateway
    /// sharing the store.
    #[arg(long, env = "CHATFLEET_API_KEYS_FILE", value_name = "PATH")]
    pub api_keys_file: Option<std::path::PathBuf>,

    /// The key that signs session tokens, shared by every gateway. Default: a key kept in the
    /// store, created by the first gateway.
    #[arg(long, env = "CHATFLEET_TOKEN_KEY", hide_env_values = true)]
    pub token_key: Option<String>,

    /// A former token key whose tokens stay valid until a deadline, as KEY@RFC3339-TIME
    /// (repeatable; for rotating --token-key without logging everyone out at once: new tokens
    /// are signed with --token-key only).
    #[arg(
        long = "previous-token-key",
        env = "CHATFLEET_PREVIOUS_TOKEN_KEYS",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "KEY@DEADLINE"
    )]
    pub previous_token_keys: Vec<String>,

    /// Seconds between keep-alive comments on an idle reply stream.
    #[arg(long, env = "CHATFLEET_SSE_KEEP_ALIVE", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=15))]
    pub sse_keep_alive: u64,

    /// What a message sent while the session's previous one is still being answered does, for
    /// sessions created without a `double_texting` of their own: `enqueue` (answer it next),
    /// `reject` (refuse it with 409 reply_in_progress) or `interrupt` (stop the reply in
    /// progress, keeping its text so far, and answer the new one).
    #[arg(long, env = "CHATFLEET_DOUBLE_TEXTING", default_value_t = DoubleTexting::Enqueue, value_parser = parse_double_texting)]
    pub double_texting: DoubleTexting,

    /// How long a gateway keeps a session record it has read (or created) in memory, in
    /// milliseconds, so that most requests need no store read to know their session exists.
    /// The price is the staleness bound after a deletion: the gateway that deletes a session
    /// forgets it at once, but another gateway may keep accepting messages for the deleted
    /// session for up to this long; the worker then drops them, so they are never answered
    /// (their streams end with a `session_not_found` error event). 0 disables the cache (a store read on every request).
    #[arg(long = "session-cache-ms", env = "CHATFLEET_SESSION_CACHE_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub session_cache_ms: u64,

    /// Seconds a streamed reply may go without an event before the gateway looks up the
    /// message's outcome in the store: a `done` or `error` lost on the bus (a broker blip) is
    /// found there, so a stream never waits forever for an answer that was stored. Each check is
    /// one store read per quiet stream.
    #[arg(long = "reply-check-secs", env = "CHATFLEET_REPLY_CHECK_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub reply_check_secs: u64,

    /// The most bytes a request's line and headers may take together; a larger request is
    /// answered 431 (HTTP/1) or refused (HTTP/2). At least 8192.
    #[arg(long = "max-header-bytes", env = "CHATFLEET_MAX_HEADER_BYTES", default_value_t = 32 * 1024, value_parser = clap::value_parser!(u64).range(8192..=1024 * 1024))]
    pub max_header_bytes: u64,

    /// Seconds a client may take to send a request's headers, from their first byte; a client
    /// that trickles them (slowloris) is disconnected.
    #[arg(long = "header-read-timeout-secs", env = "CHATFLEET_HEADER_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub header_read_timeout_secs: u64,

    /// Seconds a client may take to send a request's body, once the gateway reads it; a client
    /// that trickles it gets 408 `request_timeout` and the connection closes.
    #[arg(long = "body-read-timeout-secs", env = "CHATFLEET_BODY_READ_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_read_timeout_secs: u64,

    /// Seconds a connection may go with no request in progress and no byte either way before
    /// the gateway closes it: a client that connects and sends nothing, or keeps a connection
    /// alive and idle after its last answer. Reply streams are requests in progress and are
    /// never closed by it. Keep it above the idle timeout of a load balancer in front.
    #[arg(long = "idle-connection-timeout-secs", env = "CHATFLEET_IDLE_CONNECTION_TIMEOUT_SECS", default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_connection_timeout_secs: u64,

    /// Connections the gateway holds open at once (reply streams included); further clients
    /// wait in the listen backlog until one closes. Keep it under the process's open-file limit.
    #[arg(long = "max-connections", env = "CHATFLEET_MAX_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// A TOML file of the chat platforms and webhook integrations this gateway serves (see the
    /// README's "Channels"); values written "${NAME}" come from the environment. None: only
    /// the HTTP API.
    #[arg(long, env = "CHATFLEET_CHANNELS")]
    pub channels: Option<std::path::PathBuf>,
}

/// Parses a policy name, with the message naming the valid ones.
fn parse_double_texting(name: &str) -> Result<DoubleTexting, String> {
    name.parse()
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Address of the chat page and the API.
    #[arg(long, env = "CHATFLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The bus: `memory:` (in-process, the default here), `nats://host:4222` or
    /// `amqp://user:password@host:5672/vhost` (RabbitMQ).
    #[arg(long, env = "CHATFLEET_BUS", default_value = "memory:")]
    pub bus: String,

    /// The store: a file path for the embedded store, or `mongodb://...`.
    #[arg(long, env = "CHATFLEET_STORE", default_value = ".chatfleet/dev.redb")]
    pub store: String,

    /// Workers run inside this process.
    #[arg(long, env = "CHATFLEET_DEV_WORKERS", default_value_t = 1)]
    pub workers: usize,

    #[command(flatten)]
    pub partitions: PartitionArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub bus_security: BusSecurityArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub worker: WorkerTuning,
    #[command(flatten)]
    pub gateway: GatewayTuning,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Address of the API and the chat page.
    #[arg(long, env = "CHATFLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The bus: `nats://host:4222` (NATS JetStream 2.11+) or `amqp://user:password@host:5672/vhost`
    /// (RabbitMQ 3.10+; URL-encode the vhost, `%2f` for `/`).
    #[arg(long, env = "CHATFLEET_BUS")]
    pub bus: String,

    /// The store: `mongodb://...`.
    #[arg(long, env = "CHATFLEET_STORE")]
    pub store: String,

    #[command(flatten)]
    pub partitions: PartitionArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub bus_security: BusSecurityArgs,
    #[command(flatten)]
    pub gateway: GatewayTuning,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Address of the worker's /healthz, /readyz and /metrics.
    #[arg(long, env = "CHATFLEET_LISTEN", default_value = "127.0.0.1:9091")]
    pub listen: SocketAddr,

    /// The bus: `nats://host:4222` (NATS JetStream 2.11+) or `amqp://user:password@host:5672/vhost`
    /// (RabbitMQ 3.10+; URL-encode the vhost, `%2f` for `/`).
    #[arg(long, env = "CHATFLEET_BUS")]
    pub bus: String,

    /// The store: `mongodb://...`.
    #[arg(long, env = "CHATFLEET_STORE")]
    pub store: String,

    /// This worker's name in logs, metrics and `chatfleet status`: 1 to 128 letters, digits,
    /// `_` or `-`, unique among the live workers (default: host name and process id).
    #[arg(long, env = "CHATFLEET_WORKER_ID")]
    pub worker_id: Option<schemas::WorkerId>,

    #[command(flatten)]
    pub partitions: PartitionArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub bus_security: BusSecurityArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub worker: WorkerTuning,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MockLlmArgs {
    /// Address to serve the OpenAI-compatible API on (`/v1/chat/completions`, `/v1/models`).
    #[arg(long, env = "CHATFLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Milliseconds before the first token.
    #[arg(long, default_value_t = 200)]
    pub first_token_ms: u64,

    /// Milliseconds between tokens.
    #[arg(long, default_value_t = 20)]
    pub token_ms: u64,

    /// Tokens per reply (at least; the echo of the user's message may make it longer).
    #[arg(long, default_value_t = 32)]
    pub reply_tokens: usize,

    /// Characters of the last user message echoed at the start of each reply.
    #[arg(long, default_value_t = 48)]
    pub echo_chars: usize,

    /// Model name `GET /v1/models` lists; requests may name any model, and the reply echoes it.
    /// With --upstream, also the model asked of the upstream endpoint.
    #[arg(long, env = "CHATFLEET_MODEL", default_value = "chatfleet-mock")]
    pub model: String,

    /// Relay instead of answering: stream every chat completion from this OpenAI-compatible
    /// endpoint (e.g. another `chatfleet mock-llm` at http://127.0.0.1:9000/v1) through
    /// chatfleet's model client, chunk for chunk, keeping nothing. It serves streamed requests
    /// only, and ignores the reply settings above. `scripts/bench.sh` runs it as the `relay`
    /// target: what serving a model's stream costs without sessions, bus or store.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The bus: `nats://host:4222` (NATS JetStream 2.11+) or `amqp://user:password@host:5672/vhost`
    /// (RabbitMQ 3.10+; URL-encode the vhost, `%2f` for `/`).
    #[arg(long, env = "CHATFLEET_BUS")]
    pub bus: String,

    #[command(flatten)]
    pub partitions: PartitionArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub bus_security: BusSecurityArgs,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub log: LogArgs,
}
