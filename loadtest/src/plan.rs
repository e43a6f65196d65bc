//! What a run does, decided before it starts: the target, the scenario, each user's start
//! offset and the text of every message.
//!
//! Everything here is pure, so the schedule and the message texts can be checked without any
//! server, and the runner only has to follow them.

use std::time::Duration;

use anyhow::{bail, ensure};
use serde::Serialize;

/// Which kind of server the messages go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// A chatfleet gateway: sessions, then messages streamed as reply events.
    Gateway,
    /// An OpenAI-compatible endpoint, called directly: the baseline without the fleet.
    Openai,
}

/// Where the messages go and how to authenticate.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: TargetKind,
    /// The gateway's root (`http://127.0.0.1:8080`) or the API root with its version segment
    /// (`http://127.0.0.1:9000/v1`), without a trailing slash.
    pub url: String,
    /// For the gateway: the key that may create sessions. For OpenAI: the API key.
    pub api_key: Option<String>,
    /// The model name sent to an OpenAI endpoint; the gateway chooses its own.
    pub model: String,
}

/// The load shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Scenario {
    /// `users` users, one message each, all started at the same moment.
    Burst { users: u64 },
    /// Open loop: user `i` starts at `i / rate` seconds, for `duration`.
    Ramp {
        rate: f64,
        #[serde(rename = "duration_s", serialize_with = "serialize_secs")]
        duration: Duration,
    },
    /// `users` users started together, each sending `turns` messages in one conversation,
    /// waiting for each reply and then thinking `think` before the next.
    Conversation {
        users: u64,
        turns: u32,
        #[serde(rename = "think_ms", serialize_with = "serialize_millis")]
        think: Duration,
    },
}

fn serialize_secs<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

fn serialize_millis<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64() * 1000.0)
}

impl Scenario {
    /// The scenario's name, as on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Burst { .. } => "burst",
            Self::Ramp { .. } => "ramp",
            Self::Conversation { .. } => "conversation",
        }
    }

    /// Each user's start, as an offset from the start of the run, in user order.
    pub fn start_offsets(&self) -> Vec<Duration> {
        match *self {
            Self::Burst { users } | Self::Conversation { users, .. } => {
                vec![Duration::ZERO; usize::try_from(users).unwrap_or(usize::MAX)]
            }
            Self::Ramp { rate, duration } => ramp_offsets(rate, duration),
        }
    }

    /// Messages each user sends.
    pub fn turns(&self) -> u32 {
        match *self {
            Self::Conversation { turns, .. } => turns,
            Self::Burst { .. } | Self::Ramp { .. } => 1,
        }
    }

    /// The wait between a reply and the user's next message.
    pub fn think(&self) -> Duration {
        match *self {
            Self::Conversation { think, .. } => think,
            Self::Burst { .. } | Self::Ramp { .. } => Duration::ZERO,
        }
    }

    /// How many users the run starts.
    pub fn users(&self) -> u64 {
        match *self {
            Self::Burst { users } | Self::Conversation { users, .. } => users,
            Self::Ramp { rate, duration } => ramp_user_count(rate, duration),
        }
    }

    /// How many messages the run sends if nothing goes wrong.
    pub fn planned_messages(&self) -> u64 {
        self.users().saturating_mul(u64::from(self.turns()))
    }

    /// A short description for the summary, such as `ramp (50/s for 30 s, 1500 users)`.
    pub fn describe(&self) -> String {
        match *self {
            Self::Burst { users } => format!("burst ({users} users)"),
            Self::Ramp { rate, duration } => format!(
                "ramp ({rate}/s for {} s, {} users)",
                trim_float(duration.as_secs_f64()),
                ramp_user_count(rate, duration)
            ),
            Self::Conversation { users, turns, think } => {
                format!("conversation ({users} users x {turns} turns, think {} ms)", think.as_millis())
            }
        }
    }
}

fn trim_float(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The number of users a ramp starts: every `i` with `i / rate < duration`.
pub fn ramp_user_count(rate: f64, duration: Duration) -> u64 {
    if !(rate.is_finite() && rate > 0.0) {
        return 0;
    }
    let exact = rate * duration.as_secs_f64();
    // Rounds away the float noise of, say, 0.1 * 30 before taking the ceiling, so a whole
    // product gives exactly that many users.
    let rounded = exact.round();
    let count = if (exact - rounded).abs() < 1e-9 { rounded } else { exact.ceil() };
    // The float-to-int cast saturates; the ramp has been validated to a sane size.
    count as u64
}

/// User `i` of a ramp starts exactly `i / rate` seconds after the start, each offset computed
/// on its own from `i` so that no rounding error accumulates along the schedule.
pub fn ramp_offsets(rate: f64, duration: Duration) -> Vec<Duration> {
    (0..ramp_user_count(rate, duration)).map(|i| Duration::from_secs_f64(i as f64 / rate)).collect()
}

/// The most messages one run may plan: far beyond any sensible test, small enough that the
/// per-message records stay in memory.
pub const MAX_PLANNED_MESSAGES: u64 = 10_000_000;

/// Checks a scenario for values that cannot run, with a message naming the setting.
pub fn validate(scenario: &Scenario, echo_chars: usize, run_id: &str) -> anyhow::Result<()> {
    match *scenario {
        Scenario::Burst { users } | Scenario::Conversation { users, .. } => {
            ensure!(users >= 1, "--users must be at least 1");
        }
        Scenario::Ramp { rate, duration } => {
            ensure!(rate.is_finite() && rate > 0.0, "--rate must be a positive number of users per second");
            ensure!(!duration.is_zero(), "--duration must be longer than zero");
            ensure!(ramp_user_count(rate, duration) >= 1, "--rate times --duration starts no user");
        }
    }
    ensure!(scenario.turns() >= 1, "--turns must be at least 1");
    if scenario.users() > MAX_PLANNED_MESSAGES || scenario.planned_messages() > MAX_PLANNED_MESSAGES {
        bail!(
            "the scenario plans {} messages; at most {MAX_PLANNED_MESSAGES} fit in one run",
            scenario.planned_messages()
        );
    }
    ensure!(
        !run_id.is_empty()
            && run_id.len() <= 12
            && run_id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "--run-id must be 1 to 12 lowercase letters or digits, got {run_id:?}"
    );
    if echo_chars > 0 {
        // The isolation check needs the whole marker of the largest user and turn inside the echo.
        let longest = marker(run_id, scenario.users().saturating_sub(1), scenario.turns().saturating_sub(1));
        ensure!(
            longest.chars().count() <= echo_chars,
            "markers such as {longest:?} are longer than the {echo_chars}-character echo; use a shorter --run-id"
        );
    }
    Ok(())
}

/// A fresh run id: six lowercase letters and digits, so markers stay short.
pub fn new_run_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..6).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect()
}

/// The marker that makes a message, and so its echo, unmistakably one user's and one turn's.
pub fn marker(run_id: &str, user: u64, turn: u32) -> String {
    format!("user-{run_id}-{user} turn {turn}")
}

/// The prefix every marker of a run shares; another user's marker in a reply is found by it.
pub fn marker_prefix(run_id: &str) -> String {
    format!("user-{run_id}-")
}

/// The text of one message: the marker first, so that it is inside the echo, then the words.
pub fn message_text(run_id: &str, user: u64, turn: u32, words: &str) -> String {
    let marker = marker(run_id, user, turn);
    if words.is_empty() { marker } else { format!("{marker}: {words}") }
}

/// The idempotency key of one message: unique per run, user and turn, at most 64 characters.
pub fn client_message_id(run_id: &str, user: u64, turn: u32) -> String {
    format!("lt-{run_id}-{user}-{turn}")
}

/// Parses a duration such as `30`, `30s`, `1.5s`, `500ms` or `2m` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 =
        number.trim().parse().map_err(|_| format!("{text:?} is not a duration such as 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}; use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is not a non-negative duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_usual_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn a_ramp_starts_every_user_whose_offset_is_inside_the_duration() {
        assert_eq!(ramp_user_count(10.0, Duration::from_secs(1)), 10);
        assert_eq!(ramp_user_count(0.1, Duration::from_secs(30)), 3);
        assert_eq!(ramp_user_count(4.0, Duration::from_millis(1100)), 5);
    }

    #[test]
    fn the_longest_marker_of_the_largest_run_fits_the_mock_echo() {
        let scenario = Scenario::Burst { users: MAX_PLANNED_MESSAGES };

        assert!(validate(&scenario, 48, "abcdefghijkl").is_ok());
        assert!(validate(&scenario, 20, "abcdefghijkl").is_err());
        assert!(validate(&scenario, 0, "abcdefghijkl").is_ok());
    }

    #[test]
    fn client_message_ids_stay_within_the_api_limit() {
        assert!(client_message_id("abcdefghijkl", 9_999_999, 9999).len() <= 64);
    }
}
