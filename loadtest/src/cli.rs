//! The command line: targets, scenarios and outputs, turned into a [`RunConfig`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::plan::{self, Scenario, Target, TargetKind};
use crate::runner::{DEFAULT_WORDS, RunConfig};
use crate::webhooks::WebhookConfig;

/// Load generator for chatfleet: many users chatting at once, through a gateway or straight to
/// an OpenAI-compatible model for a baseline.
///
/// Every message opens with a marker naming its user, and the mock model echoes it, so the run
/// also proves that each user got their own reply and nobody else's. Latencies are measured from
/// when each message was due, so a target that falls behind cannot hide it. The exit code is 0
/// only when every message was answered without error or violation; 1 otherwise; 2 when the run
/// could not start.
#[derive(Debug, Parser)]
#[command(name = "chatfleet-loadtest", version, max_term_width = 100)]
#[command(after_help = "Examples:
  chatfleet-loadtest burst --users 1000
  chatfleet-loadtest ramp --rate 50 --duration 60s --svg ramp.svg --json ramp.json
  chatfleet-loadtest conversation --users 200 --turns 5 --think-ms 500
  chatfleet-loadtest webhooks --conversations 500 --secret whsec_... --listen 127.0.0.1:9900
  chatfleet-loadtest --target openai --url http://127.0.0.1:9000/v1 burst --users 1000")]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: ScenarioCommand,

    #[command(flatten)]
    pub options: Options,
}

/// The load shape.
#[derive(Debug, Subcommand)]
pub enum ScenarioCommand {
    /// N users, one message each, all started at the same moment.
    Burst {
        /// How many users.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        users: u64,
    },
    /// Open loop: user i starts exactly i/RATE seconds into the run, whether or not earlier
    /// users have been answered.
    Ramp {
        /// New users per second (fractions allowed: 0.5 is one every two seconds).
        #[arg(long)]
        rate: f64,
        /// How long users keep arriving: 30, 30s, 500ms, 2m.
        #[arg(long, value_parser = plan::parse_duration)]
        duration: Duration,
    },
    /// N users at once, each sending TURNS messages in one conversation: wait for the reply,
    /// think, send the next.
    Conversation {
        /// How many users.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        users: u64,
        /// Messages per user.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        turns: u32,
        /// Pause between a reply and the user's next message, in milliseconds.
        #[arg(long, default_value_t = 0)]
        think_ms: u64,
    },
    /// N signed webhook conversations at once, one message each, through the gateway's webhook
    /// channel to their signed deliveries at a receiver this command runs (point the
    /// integration's `url` in the gateway's channels file at --listen). Reports the delivery
    /// latency from each message sent to its reply received, and replies missing or repeated.
    Webhooks {
        /// How many conversations.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        conversations: u64,
        /// The integration's name: messages go to /v1/channels/webhooks/<NAME>.
        #[arg(long, default_value = "loadtest")]
        integration: String,
        /// The integration's Standard Webhooks secret (whsec_...): signs messages, verifies replies.
        #[arg(long, env = "CHATFLEET_LOADTEST_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// Where the receiver of the deliveries listens.
        #[arg(long, default_value = "127.0.0.1:9900")]
        listen: std::net::SocketAddr,
    },
}

/// Where the messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    /// A chatfleet gateway (sessions, then messages streamed as reply events).
    Gateway,
    /// An OpenAI-compatible endpoint, called directly (POST /chat/completions with streaming).
    Openai,
}

/// Options shared by every scenario; they may come before or after the scenario's name.
#[derive(Debug, Args)]
pub struct Options {
    /// What to load.
    #[arg(long, value_enum, default_value_t = TargetArg::Gateway, global = true)]
    pub target: TargetArg,

    /// The gateway's root, or the OpenAI API root with its version segment
    /// [default: http://127.0.0.1:8080 for the gateway, http://127.0.0.1:9000/v1 for openai]
    #[arg(long, global = true)]
    pub url: Option<String>,

    /// Gateway: a key allowed to create sessions. OpenAI: the API key.
    #[arg(long, env = "CHATFLEET_LOADTEST_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,

    /// Model name sent to an OpenAI endpoint (the gateway's workers choose their own).
    #[arg(long, default_value = "gpt-4o-mini", global = true)]
    pub model: String,

    /// Longest wait for a complete reply (and for any other request), in seconds.
    #[arg(long, default_value_t = 60.0, global = true)]
    pub timeout: f64,

    /// Words each message carries after its marker (e.g. to send longer prompts, or mock
    /// directives such as [mock:stall=2000]).
    #[arg(long, default_value = DEFAULT_WORDS, global = true)]
    pub words: String,

    /// Characters of a message the model echoes at the start of its reply (the mock model and
    /// the stand-in echo 48). 0 turns the echo check off, for a real model; the check that no
    /// reply carries another user's marker stays.
    #[arg(long, default_value_t = 48, global = true)]
    pub echo_chars: usize,

    /// Names this run in markers and idempotency keys (1 to 12 lowercase letters or digits)
    /// [default: random]
    #[arg(long, global = true)]
    pub run_id: Option<String>,

    /// Write every figure, and one record per message, to this JSON file.
    #[arg(long, value_name = "PATH", global = true)]
    pub json: Option<PathBuf>,

    /// Write a latency chart (by percentile, and over time) to this SVG file.
    #[arg(long, value_name = "PATH", global = true)]
    pub svg: Option<PathBuf>,

    /// No progress bar (there is none anyway when stderr is not a terminal).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

impl Cli {
    /// The run this command line asks for; `terminal` says whether stderr is a terminal.
    pub fn run_config(&self, terminal: bool) -> anyhow::Result<RunConfig> {
        let o = &self.options;
        let kind = match o.target {
            TargetArg::Gateway => TargetKind::Gateway,
            TargetArg::Openai => TargetKind::Openai,
        };
        let url = match (&o.url, kind) {
            (Some(url), _) => url.clone(),
            (None, TargetKind::Gateway) => "http://127.0.0.1:8080".to_owned(),
            (None, TargetKind::Openai) => "http://127.0.0.1:9000/v1".to_owned(),
        };
        let url = check_url(&url)?;
        if !(o.timeout.is_finite() && o.timeout > 0.0) {
            bail!("--timeout must be a positive number of seconds, got {}", o.timeout);
        }
        let timeout = Duration::try_from_secs_f64(o.timeout).context("--timeout is too large")?;
        let scenario = match self.scenario {
            ScenarioCommand::Burst { users } => Scenario::Burst { users },
            ScenarioCommand::Ramp { rate, duration } => Scenario::Ramp { rate, duration },
            ScenarioCommand::Conversation { users, turns, think_ms } => {
                Scenario::Conversation { users, turns, think: Duration::from_millis(think_ms) }
            }
            ScenarioCommand::Webhooks { .. } => bail!("the webhooks scenario is run by webhook_config"),
        };
        let run_id = o.run_id.clone().unwrap_or_else(plan::new_run_id);
        plan::validate(&scenario, o.echo_chars, &run_id)?;
        Ok(RunConfig {
            target: Target { kind, url, api_key: o.api_key.clone(), model: o.model.clone() },
            scenario,
            run_id,
            words: o.words.clone(),
            echo_chars: o.echo_chars,
            timeout,
            progress: terminal && !o.no_progress,
        })
    }
}

impl Cli {
    /// The webhooks run this command line asks for; None for the other scenarios.
    pub fn webhook_config(&self) -> anyhow::Result<Option<WebhookConfig>> {
        let ScenarioCommand::Webhooks { conversations, integration, secret, listen } = &self.scenario else {
            return Ok(None);
        };
        let o = &self.options;
        if o.target != TargetArg::Gateway {
            bail!("the webhooks scenario needs --target gateway");
        }
        if o.svg.is_some() {
            bail!("the webhooks scenario draws no chart: leave out --svg");
        }
        let url = check_url(o.url.as_deref().unwrap_or("http://127.0.0.1:8080"))?;
        if !(o.timeout.is_finite() && o.timeout > 0.0) {
            bail!("--timeout must be a positive number of seconds, got {}", o.timeout);
        }
        crate::webhooks::signing_key(secret)?;
        let run_id = o.run_id.clone().unwrap_or_else(plan::new_run_id);
        plan::validate(&Scenario::Burst { users: *conversations }, o.echo_chars, &run_id)?;
        Ok(Some(WebhookConfig {
            url,
            integration: integration.clone(),
            secret: secret.clone(),
            listen: *listen,
            conversations: *conversations,
            run_id,
            words: o.words.clone(),
            timeout: Duration::try_from_secs_f64(o.timeout).context("--timeout is too large")?,
        }))
    }
}

/// An http or https URL, without the trailing slash the paths are appended after.
fn check_url(url: &str) -> anyhow::Result<String> {
    let parsed = reqwest::Url::parse(url).map_err(|error| anyhow::anyhow!("--url {url:?} is not a URL: {error}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("--url {url:?} must start with http:// or https://");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        bail!("--url {url:?} must not have a query or a fragment");
    }
    Ok(url.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> anyhow::Result<RunConfig> {
        let cli = Cli::try_parse_from(args)?;
        cli.run_config(false)
    }

    #[test]
    fn options_may_follow_the_scenario() {
        let config = config(&["lt", "burst", "--users", "3", "--target", "openai", "--run-id", "abc"]).unwrap();

        assert_eq!(config.target.kind, TargetKind::Openai);
        assert_eq!(config.target.url, "http://127.0.0.1:9000/v1");
        assert_eq!(config.scenario, Scenario::Burst { users: 3 });
        assert_eq!(config.run_id, "abc");
    }

    #[test]
    fn a_trailing_slash_is_dropped_from_the_url() {
        let config = config(&["lt", "--url", "http://gw:8080/", "burst", "--users", "1"]).unwrap();

        assert_eq!(config.target.url, "http://gw:8080");
    }

    #[test]
    fn a_url_that_is_not_http_is_refused_in_one_line() {
        let error = config(&["lt", "--url", "ftp://x", "burst", "--users", "1"]).unwrap_err().to_string();

        assert_eq!(error, "--url \"ftp://x\" must start with http:// or https://");
    }

    #[test]
    fn a_ramp_with_no_rate_is_refused() {
        assert!(config(&["lt", "ramp", "--rate", "0", "--duration", "10s"]).is_err());
        assert!(config(&["lt", "ramp", "--rate", "NaN", "--duration", "10s"]).is_err());
    }

    #[test]
    fn the_webhooks_scenario_takes_its_secret_and_receiver() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let args = ["lt", "webhooks", "--conversations", "5", "--secret", secret, "--listen", "127.0.0.1:0"];
        let cli = Cli::try_parse_from(args).unwrap();

        let config = cli.webhook_config().unwrap().unwrap();

        assert_eq!((config.conversations, config.integration.as_str()), (5, "loadtest"));
        let bad = ["lt", "webhooks", "--conversations", "5", "--secret", "not-a-secret"];
        assert!(Cli::try_parse_from(bad).unwrap().webhook_config().is_err());
        let burst = Cli::try_parse_from(["lt", "burst", "--users", "1"]).unwrap();
        assert!(burst.webhook_config().unwrap().is_none());
    }

    #[test]
    fn zero_users_are_refused_by_the_parser() {
        assert!(Cli::try_parse_from(["lt", "burst", "--users", "0"]).is_err());
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
