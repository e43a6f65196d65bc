//! `chatfleet dead-letters list|replay`: the user messages a fleet gave up on (unreadable, or
//! started too many times across workers), on NATS (stream `CHATFLEET_DEAD`) and RabbitMQ
//! (queue `chatfleet.dead`) alike.

use anyhow::Context;
use bus::{Bus, DeadLetter, Replay};
use clap::{Args, Subcommand};

use crate::cli::{LogArgs, LogFormat, PartitionArgs};
use crate::wiring::{self, BusChoice};

#[derive(Debug, Clone, Args)]
pub struct DeadLettersArgs {
    #[command(subcommand)]
    pub action: DeadLettersAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DeadLettersAction {
    /// Lists dead letters, oldest first, leaving them in place.
    List(ListArgs),
    /// Publishes dead letters to their partitions again (as new bus messages) and removes them.
    Replay(ReplayArgs),
}

/// Which deployment's dead letters.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The bus: `nats://host:4222` or `amqp://user:password@host:5672/vhost`.
    #[arg(long, env = "CHATFLEET_BUS")]
    pub bus: String,

    #[command(flatten)]
    pub partitions: PartitionArgs,

    #[command(flatten)]
    pub nats: crate::cli::NatsArgs,
    #[command(flatten)]
    pub bus_security: crate::cli::BusSecurityArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: Target,

    /// At most this many.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub target: Target,

    /// Replay every dead letter.
    #[arg(long, conflicts_with = "ids")]
    pub all: bool,

    /// The ids (`dead-letters list`) of the dead letters to replay.
    #[arg(required_unless_present = "all")]
    pub ids: Vec<String>,

    #[command(flatten)]
    pub log: LogArgs,
}

impl DeadLettersArgs {
    pub fn log_format(&self) -> LogFormat {
        match &self.action {
            DeadLettersAction::List(a) => a.log.log_format,
            DeadLettersAction::Replay(a) => a.log.log_format,
        }
    }
}

async fn connect(target: &Target) -> anyhow::Result<std::sync::Arc<dyn Bus>> {
    let partitions = schemas::PartitionCount::new(target.partitions.partitions)
        .map_err(|e| anyhow::anyhow!("--partitions / CHATFLEET_PARTITIONS: {e}"))?;
    let choice = match wiring::parse_bus(&target.bus)? {
        BusChoice::Memory => anyhow::bail!(
            "--bus / CHATFLEET_BUS: dead letters live on a broker; give a URL such as nats://host:4222 or amqp://host:5672"
        ),
        other => other,
    };
    wiring::connect_bus(
        choice,
        partitions,
        "chatfleet-dead-letters",
        bus::OwnershipSettings::default(),
        &target.nats,
        &target.bus_security,
    )
    .await
}

pub async fn run(args: DeadLettersArgs) -> anyhow::Result<()> {
    let printed = match args.action {
        DeadLettersAction::List(args) => {
            let bus = connect(&args.target).await?;
            let letters = bus.dead_letters(args.limit).await.context("cannot read the dead letters")?;
            print(&letters, args.json)
        }
        DeadLettersAction::Replay(args) => {
            let bus = connect(&args.target).await?;
            let which = if args.all { Replay::All } else { Replay::Ids(args.ids.clone()) };
            let replayed = bus.replay_dead_letters(&which).await.context("cannot replay the dead letters")?;
            let missing: Vec<&String> =
                args.ids.iter().filter(|id| !replayed.iter().any(|letter| &letter.id == *id)).collect();
            if !missing.is_empty() {
                eprintln!("not found among the dead letters: {}", joined(&missing));
            }
            println!("replayed {} dead letter(s)", replayed.len());
            Ok(())
        }
    };
    // A closed stdout (`chatfleet dead-letters list | head`) ends the listing quietly.
    match printed {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn joined(ids: &[&String]) -> String {
    ids.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

fn print(letters: &[DeadLetter], json: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        return writeln!(out, "{}", serde_json::to_string_pretty(letters).map_err(std::io::Error::other)?);
    }
    writeln!(out, "{:<20} {:<26} {:<38} {:<16} at", "id", "session", "message", "reason")?;
    for l in letters {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        writeln!(
            out,
            "{:<20} {:<26} {:<38} {:<16} {}",
            l.id,
            show(&l.session_id),
            show(&l.message_id),
            l.reason,
            show(&l.at)
        )?;
    }
    writeln!(out, "{} dead letter(s)", letters.len())
}
