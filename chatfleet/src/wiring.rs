//! Turning settings into running parts: the bus, the store and the model named by URLs, with
//! one clear error naming the setting when something is wrong.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bus::{AmqpBus, AmqpSettings, Bus, MemoryBus, NatsBus, NatsSettings};
use llm::ChatModel;
use schemas::PartitionCount;
use store::Store;

use crate::cli::{BusSecurityArgs, ModelArgs, NatsArgs};

/// Where the processes of a deployment meet: one in-process bus, or a broker.
pub enum BusChoice {
    Memory,
    Nats(String),
    Amqp(String),
}

pub fn parse_bus(url: &str) -> anyhow::Result<BusChoice> {
    let lower = url.to_ascii_lowercase();
    if lower == "memory:" || lower == "memory://" {
        Ok(BusChoice::Memory)
    } else if lower.starts_with("nats://") || lower.starts_with("tls://") {
        Ok(BusChoice::Nats(url.to_owned()))
    } else if lower.starts_with("amqp://") || lower.starts_with("amqps://") {
        Ok(BusChoice::Amqp(url.to_owned()))
    } else {
        bail!(
            "--bus / CHATFLEET_BUS: {:?} is not a bus URL; use nats://host:4222 (or a cluster's servers separated by commas), amqp://user:password@host:5672/vhost, \
             or memory: with `chatfleet dev`",
            shown_setting(url)
        )
    }
}

/// A URL setting as it may be shown: credentials replaced by `***`; text that is no URL at all
/// (a typo such as `localhost:4222`) as it is, since it holds none.
fn shown_setting(text: &str) -> String {
    if text.contains("://") { schemas::redact_url(text) } else { text.to_owned() }
}

pub async fn connect_bus(
    choice: BusChoice,
    partitions: PartitionCount,
    client_name: &str,
    ownership: bus::OwnershipSettings,
    nats: &NatsArgs,
    security: &BusSecurityArgs,
) -> anyhow::Result<Arc<dyn Bus>> {
    let retention = nats.event_retention_secs.map(Duration::from_secs);
    match choice {
        BusChoice::Memory => {
            Ok(Arc::new(MemoryBus::with_event_retention(partitions, retention.unwrap_or(bus::DEFAULT_EVENT_RETENTION))))
        }
        BusChoice::Nats(url) => {
            let mut settings = NatsSettings::new(url, partitions);
            settings.client_name = client_name.to_owned();
            settings.ownership = ownership;
            settings.replicas = nats.nats_replicas;
            settings.auth = security.nats_auth();
            settings.tls = security.tls();
            settings.event_retention = retention;
            let bus = NatsBus::connect(settings).await.context("--bus / CHATFLEET_BUS")?;
            Ok(Arc::new(bus))
        }
        BusChoice::Amqp(url) => {
            if security.names_nats_credentials() {
                bail!(
                    "--nats-user, --nats-token, --nats-nkey and --nats-creds are for NATS; a RabbitMQ bus takes its user and password in the amqps:// URL"
                );
            }
            let mut settings = AmqpSettings::new(url, partitions);
            settings.client_name = client_name.to_owned();
            settings.ownership = ownership;
            settings.tls = security.tls();
            settings.event_retention = retention;
            let bus = AmqpBus::connect(settings).await.context("--bus / CHATFLEET_BUS")?;
            Ok(Arc::new(bus))
        }
    }
}

/// True for the store URLs that name a MongoDB deployment.
pub fn is_mongodb(url: &str) -> bool {
    url.starts_with("mongodb://") || url.starts_with("mongodb+srv://")
}

pub async fn connect_store(url: &str, allow_embedded: bool) -> anyhow::Result<Arc<dyn Store>> {
    if is_mongodb(url) {
        let store = store::mongo::MongoStore::connect(url).await.context("--store / CHATFLEET_STORE")?;
        return Ok(Arc::new(store));
    }
    if url.contains("://") {
        bail!("--store / CHATFLEET_STORE: {:?} is neither mongodb://... nor a file path", schemas::redact_url(url));
    }
    if !allow_embedded {
        bail!(
            "--store / CHATFLEET_STORE: the embedded store ({url}) works only with `chatfleet dev`; \
             gateways and workers in separate processes need mongodb://..."
        );
    }
    let store = store::embedded::EmbeddedStore::open(Path::new(url)).context("--store / CHATFLEET_STORE")?;
    Ok(Arc::new(store))
}

/// The model named by the settings; None when no endpoint is configured.
pub fn connect_model(args: &ModelArgs) -> anyhow::Result<Option<Arc<dyn ChatModel>>> {
    let Some(base_url) = &args.llm_base_url else {
        return Ok(None);
    };
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        bail!("--llm-base-url / OPENAI_BASE_URL: {base_url:?} is not an http(s) URL");
    }
    let timeout = Duration::from_secs(args.llm_timeout.max(1));
    let model = llm::openai::OpenAiModel::new(llm::openai::OpenAiSettings {
        base_url: base_url.clone(),
        api_key: args.llm_api_key.clone(),
        model: args.model.clone(),
        first_token_timeout: timeout,
        idle_timeout: timeout,
        max_tokens: None,
    })
    .map_err(|e| anyhow::anyhow!("--llm-base-url / OPENAI_BASE_URL: {e}"))?;
    Ok(Some(Arc::new(model)))
}
