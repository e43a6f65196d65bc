//! The channels file (`--channels PATH`, `CHATFLEET_CHANNELS`): TOML, every value may be
//! written `"${NAME}"` and is then taken from the environment at start-up. A missing variable,
//! an unknown key or a malformed section ends start-up with one line naming it. Each
//! platform's own section is parsed by its folder's `config.rs`; this file holds what they
//! share: reading, substitution, [`Secret`], URL rules and the delivery schedule.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::slack::SlackConfig;
use super::teams::TeamsConfig;
use super::webhooks::WebhookConfig;

/// A secret from the channels file. It never appears in logs, errors or `Debug` output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for signing and verifying only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why the channels file cannot be used: one line naming the file and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("channels file {path}: {problem}")]
pub struct ConfigError {
    pub path: String,
    pub problem: String,
}

/// The channels a gateway serves, as configured.
#[derive(Debug, Clone, Default)]
pub struct ChannelsConfig {
    /// Named webhook integrations (`[webhooks.<name>]`).
    pub webhooks: BTreeMap<String, WebhookConfig>,
    /// The Slack app (`[slack]`).
    pub slack: Option<SlackConfig>,
    /// The Teams bot (`[teams]`).
    pub teams: Option<TeamsConfig>,
    /// How replies are delivered (`[delivery]`).
    pub delivery: DeliverySettings,
}

/// Retries of outbound deliveries (`[delivery]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeliverySettings {
    /// The wait before each retry: the first after the first failed attempt, and so on. After
    /// the last one fails, the reply is kept as undeliverable. Each wait is jittered by up to a
    /// fifth either way, and a receiver's `Retry-After` that asks for longer wins.
    pub retry_schedule: Vec<Duration>,
    /// How long one attempt may take.
    pub attempt_timeout: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        // About 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, then hourly: about a day in all.
        let mut retry_schedule: Vec<Duration> =
            [5, 30, 120, 600, 1800, 3600].into_iter().map(Duration::from_secs).collect();
        retry_schedule.extend(std::iter::repeat_n(Duration::from_secs(3600), 22));
        Self { retry_schedule, attempt_timeout: Duration::from_secs(10) }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliverySection {
    retry_schedule: Option<Vec<String>>,
    attempt_timeout: Option<String>,
}

/// Reads and checks the channels file, with `${NAME}` taken from the process environment.
pub fn load(path: &Path) -> Result<ChannelsConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError { path: shown.clone(), problem: format!("cannot read it: {e}") })?;
    parse(&text, |name| std::env::var(name).ok()).map_err(|problem| ConfigError { path: shown, problem })
}

/// Parses a channels file; `env` looks up the variables of `${NAME}`.
pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<ChannelsConfig, String> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| syntax_error(text, &e))?;
    substitute_table(&mut table, "", &env)?;
    let mut config = ChannelsConfig::default();
    for (key, value) in table {
        match key.as_str() {
            "webhooks" => {
                let toml::Value::Table(integrations) = value else {
                    return Err("[webhooks] must be a table of named integrations ([webhooks.<name>])".into());
                };
                for (name, section) in integrations {
                    let webhook = WebhookConfig::from_section(&name, section)?;
                    config.webhooks.insert(name, webhook);
                }
            }
            "delivery" => config.delivery = delivery_settings(value)?,
            "slack" => config.slack = Some(SlackConfig::from_section(value)?),
            "teams" => config.teams = Some(TeamsConfig::from_section(value)?),
            other => {
                return Err(format!(
                    "unknown key {other:?} (expected [slack], [teams], [webhooks.<name>] or [delivery])"
                ));
            }
        }
    }
    Ok(config)
}

/// Deserializes one section, naming it in the error, which serde writes on one line.
pub(crate) fn section<T: serde::de::DeserializeOwned>(name: &str, value: toml::Value) -> Result<T, String> {
    value.try_into().map_err(|e: toml::de::Error| format!("[{name}]: {}", one_line(e.message())))
}

fn delivery_settings(value: toml::Value) -> Result<DeliverySettings, String> {
    let section: DeliverySection = section("delivery", value)?;
    let mut settings = DeliverySettings::default();
    if let Some(schedule) = section.retry_schedule {
        settings.retry_schedule = schedule
            .iter()
            .map(|d| parse_duration(d).map_err(|e| format!("[delivery] retry_schedule: {e}")))
            .collect::<Result<_, _>>()?;
    }
    if let Some(timeout) = section.attempt_timeout {
        settings.attempt_timeout = parse_duration(&timeout).map_err(|e| format!("[delivery] attempt_timeout: {e}"))?;
        if settings.attempt_timeout.is_zero() {
            return Err("[delivery] attempt_timeout must be more than zero".into());
        }
    }
    Ok(settings)
}

/// `250ms`, `5s`, `2m`, `1h`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as \"250ms\", \"5s\", \"2m\" or \"1h\"");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(bad()),
    }
}

/// Checks a URL the gateway calls: `https://`, or `http://` when `allow_http` is set or the host is
/// a loopback address (local fakes and tests).
pub(crate) fn checked_url(what: &str, url: &str, allow_http: bool) -> Result<reqwest::Url, String> {
    let shown = schemas::redact_url(url);
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{what}: {shown:?} is not a URL: {e}"))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(name)) => name == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if allow_http || loopback => Ok(parsed),
        _ => Err(format!("{what}: {shown} must be an https:// URL (http:// only on a loopback host)")),
    }
}

fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let line = e.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    match line {
        Some(line) => format!("line {line}: {}", one_line(e.message())),
        None => one_line(e.message()),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn substitute_table(table: &mut toml::Table, path: &str, env: &impl Fn(&str) -> Option<String>) -> Result<(), String> {
    for (key, value) in table.iter_mut() {
        let here = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        substitute(value, &here, env)?;
    }
    Ok(())
}

fn substitute(value: &mut toml::Value, path: &str, env: &impl Fn(&str) -> Option<String>) -> Result<(), String> {
    match value {
        toml::Value::String(text) => *text = expand(text, path, env)?,
        toml::Value::Array(items) => {
            for item in items {
                substitute(item, path, env)?;
            }
        }
        toml::Value::Table(table) => substitute_table(table, path, env)?,
        _ => {}
    }
    Ok(())
}

/// Replaces every `${NAME}` in `text` with the variable's value. The error names the key and
/// the variable, never a value.
fn expand(text: &str, path: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("{path}: \"${{\" without a closing \"}}\""))?;
        let name = &after[..end];
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!("{path}: ${{{name}}} is not a valid environment variable name"));
        }
        let value = env(name).ok_or_else(|| format!("{path}: the environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn env(name: &str) -> Option<String> {
        (name == "HOOK_SECRET").then(|| SECRET.to_owned())
    }

    #[test]
    fn variables_are_substituted_and_secrets_never_shown() {
        let text = "[webhooks.acme]\nsecret = \"${HOOK_SECRET}\"\nurl = \"http://127.0.0.1:9/hook\"\n";

        let config = parse(text, env).unwrap();

        let acme = &config.webhooks["acme"];
        assert_eq!(acme.secret.expose(), SECRET);
        assert!(!format!("{config:?}").contains("MfKQ9r8"));
    }

    #[test]
    fn a_missing_variable_is_named_on_one_line() {
        let text = "[webhooks.acme]\nsecret = \"${NOT_SET_ANYWHERE}\"\nurl = \"http://127.0.0.1:9/\"\n";

        let error = parse(text, env).unwrap_err();

        assert_eq!(error, "webhooks.acme.secret: the environment variable NOT_SET_ANYWHERE is not set");
    }

    #[test]
    fn an_unknown_key_is_named() {
        let text = format!("[webhooks.acme]\nsecret = \"{SECRET}\"\nurl = \"http://127.0.0.1:9/\"\ncolour = \"red\"\n");

        let error = parse(&text, env).unwrap_err();

        assert!(error.starts_with("[webhooks.acme]: unknown field `colour`"), "{error}");
        assert!(!error.contains('\n'));
    }

    #[test]
    fn a_slack_section_needs_both_secrets_and_an_https_api_url_off_loopback() {
        let good = "[slack]\nsigning_secret = \"s\"\nbot_token = \"xoxb-1\"\n";
        let config = parse(good, env).unwrap();
        assert_eq!(config.slack.unwrap().api_url.as_str(), "https://slack.com/api/");
        assert!(parse("[slack]\nsigning_secret = \"s\"\n", env).unwrap_err().contains("bot_token"));
        let plain = format!("{good}api_url = \"http://slack.example.com/api\"\n");
        assert!(parse(&plain, env).unwrap_err().contains("https://"));
    }

    #[test]
    fn an_unknown_section_and_a_syntax_error_are_refused_on_one_line() {
        assert!(parse("[discord]\n", env).unwrap_err().contains("unknown key \"discord\""));
        let error = parse("[webhooks.acme\n", env).unwrap_err();
        assert!(error.starts_with("line 1: "), "{error}");
        assert!(!error.contains('\n'));
    }

    #[test]
    fn a_malformed_secret_is_refused_without_showing_it() {
        let text = "[webhooks.acme]\nsecret = \"hunter2-not-base64!\"\nurl = \"http://127.0.0.1:9/\"\n";

        let error = parse(text, env).unwrap_err();

        assert!(error.contains("[webhooks.acme] secret"), "{error}");
        assert!(!error.contains("hunter2"));
    }

    #[test]
    fn the_delivery_schedule_is_configurable() {
        let text = "[delivery]\nretry_schedule = [\"200ms\", \"1s\", \"2m\"]\nattempt_timeout = \"3s\"\n";

        let config = parse(text, env).unwrap();

        let expected = vec![Duration::from_millis(200), Duration::from_secs(1), Duration::from_secs(120)];
        assert_eq!(config.delivery.retry_schedule, expected);
        assert_eq!(config.delivery.attempt_timeout, Duration::from_secs(3));
        assert!(parse("[delivery]\nretry_schedule = [\"soon\"]\n", env).unwrap_err().contains("\"soon\""));
    }

    #[test]
    fn slack_and_teams_urls_must_be_https_except_on_loopback() {
        assert!(checked_url("api_url", "https://slack.com/api/", false).is_ok());
        assert!(checked_url("api_url", "http://127.0.0.1:9000/api/", false).is_ok());
        assert!(checked_url("api_url", "http://localhost:9000/api/", false).is_ok());
        assert!(checked_url("api_url", "http://slack.example.com/api/", false).is_err());
        assert!(checked_url("url", "http://hooks.internal/", true).is_ok());
    }
}
