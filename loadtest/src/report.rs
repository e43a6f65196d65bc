//! The figures of a run: per-message records, latency histograms and percentiles, throughput,
//! errors by kind, isolation violations and history problems, and their renderings as the
//! summary table and as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Serialize, Serializer};

use crate::isolation::Violations;
use crate::plan::{Scenario, TargetKind};

/// The longest latency a histogram tells apart; anything slower is counted as this.
const HISTOGRAM_MAX: Duration = Duration::from_secs(3600);

/// Latencies in microseconds with three significant digits: precise to 0.1 % at any scale, in a
/// fixed few dozen kilobytes however many values are recorded.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    histogram: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        let max_micros = u64::try_from(HISTOGRAM_MAX.as_micros()).unwrap_or(u64::MAX);
        // The bounds are constants that hdrhistogram accepts; failing here is a programming error.
        let histogram = Histogram::new_with_max(max_micros, 3).expect("valid histogram bounds");
        Self { histogram }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, latency: Duration) {
        self.histogram.saturating_record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    /// The latency that a fraction `quantile` (0 to 1) of the values are at or below, in
    /// milliseconds.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        micros_to_ms(self.histogram.value_at_quantile(quantile))
    }

    pub fn summary(&self) -> LatencySummary {
        if self.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.histogram.len(),
            min_ms: micros_to_ms(self.histogram.min()),
            mean_ms: self.histogram.mean().round() / 1000.0,
            p50_ms: self.quantile_ms(0.50),
            p90_ms: self.quantile_ms(0.90),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: micros_to_ms(self.histogram.max()),
        }
    }
}

fn micros_to_ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// The percentiles of one latency, in milliseconds; all zero when nothing was measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Every latency the run measures.
#[derive(Debug, Clone, Default)]
pub struct Histograms {
    /// From the message's scheduled start to its first token.
    pub first_token: LatencyHistogram,
    /// From the message's scheduled start to the end of its reply.
    pub full_reply: LatencyHistogram,
    /// Between consecutive tokens of a reply.
    pub inter_token: LatencyHistogram,
    /// `POST /v1/sessions` (gateway target only).
    pub session_create: LatencyHistogram,
    /// How late the generator began a message's work after its scheduled start: large values
    /// mean the load generator itself could not keep up.
    pub start_lag: LatencyHistogram,
}

/// What became of one planned message.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Answered {
        #[serde(rename = "first_token_ms", serialize_with = "ms_option")]
        first_token: Option<Duration>,
        #[serde(rename = "full_reply_ms", serialize_with = "ms")]
        total: Duration,
        tokens: u64,
        resets: u32,
        isolation_violations: u64,
        stream_problems: usize,
    },
    Failed {
        error: String,
    },
    /// Never sent, because the user's session could not be created, an earlier turn failed, or
    /// the run was interrupted.
    NotSent {
        reason: String,
    },
}

/// One planned message and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageRecord {
    pub user: u64,
    pub turn: u32,
    /// When the message was due, from the start of the run.
    #[serde(rename = "scheduled_s", serialize_with = "secs")]
    pub scheduled: Duration,
    /// How late the generator began its work after that.
    #[serde(rename = "start_lag_ms", serialize_with = "ms")]
    pub start_lag: Duration,
    #[serde(flatten)]
    pub outcome: Outcome,
}

fn secs<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

/// Milliseconds to the microsecond, which prints without float noise such as 505.88500000000005.
fn ms<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_micros() as f64 / 1000.0)
}

fn ms_option<S: Serializer>(value: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => ms(value, serializer),
        None => serializer.serialize_none(),
    }
}

/// A count with the first few instances spelled out.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Problems {
    pub count: u64,
    pub examples: Vec<String>,
}

impl Problems {
    const MAX_EXAMPLES: usize = 10;

    pub fn add(&mut self, problem: String) {
        self.count += 1;
        if self.examples.len() < Self::MAX_EXAMPLES {
            self.examples.push(problem);
        }
    }
}

/// The outcome of comparing gateway histories with what was sent and received.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HistoryCheck {
    /// Whether the scenario and target call for the check (gateway conversations).
    pub applies: bool,
    /// Sessions whose history was fetched and compared.
    pub checked: u64,
    /// Sessions left out because one of their messages failed, which leaves what the history
    /// should hold uncertain.
    pub skipped: u64,
    /// Sessions whose history was incomplete, out of order or wrong, or could not be fetched.
    pub problems: Problems,
}

/// Where the messages went.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    pub kind: TargetKind,
    pub url: String,
    /// The model asked for (OpenAI target only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Message counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub planned: u64,
    pub sent: u64,
    pub answered: u64,
    pub failed: u64,
    pub not_sent: u64,
    /// Tokens received, including any a reset voided.
    pub tokens: u64,
    pub resets: u64,
}

/// Messages and tokens per second over the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Throughput {
    pub messages_per_s: f64,
    pub tokens_per_s: f64,
}

/// The latency summaries, for the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySummaries {
    pub first_token: LatencySummary,
    pub full_reply: LatencySummary,
    pub inter_token: LatencySummary,
    pub session_create: LatencySummary,
    pub start_lag: LatencySummary,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run_id: String,
    pub scenario: Scenario,
    pub target: TargetInfo,
    /// When the first user was due, RFC 3339.
    pub started_at: String,
    /// From the first user's start to the end of the last reply.
    #[serde(rename = "duration_s", serialize_with = "secs")]
    pub duration: Duration,
    /// The run was stopped (Ctrl-C) before every message was done.
    pub interrupted: bool,
    pub counts: Counts,
    pub throughput: Throughput,
    #[serde(rename = "latency_ms")]
    pub latency: LatencySummaries,
    /// Failed messages by kind of error.
    pub errors: BTreeMap<String, u64>,
    pub isolation: Violations,
    pub stream_problems: Problems,
    pub history: HistoryCheck,
    pub passed: bool,
    pub records: Vec<MessageRecord>,
    #[serde(skip)]
    pub histograms: Histograms,
}

impl Report {
    /// Whether every planned message got a correct reply of its own: what the exit code says.
    pub fn compute_passed(&self) -> bool {
        !self.interrupted
            && self.counts.answered == self.counts.planned
            && self.counts.failed == 0
            && self.counts.not_sent == 0
            && self.isolation.total() == 0
            && self.stream_problems.count == 0
            && self.history.problems.count == 0
    }

    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// The summary printed at the end of a run.
    pub fn summary_table(&self) -> String {
        let mut out = String::new();
        let c = &self.counts;
        let target = match &self.target.model {
            Some(model) => format!("{} {} (model {model})", target_name(self.target.kind), self.target.url),
            None => format!("{} {}", target_name(self.target.kind), self.target.url),
        };
        let _ = writeln!(out, "{:<22}{}", "scenario", self.scenario.describe());
        let _ = writeln!(out, "{:<22}{target}", "target");
        let _ = writeln!(out, "{:<22}{}  (started {})", "run id", self.run_id, self.started_at);
        let _ = writeln!(
            out,
            "{:<22}{:.2} s{}",
            "duration",
            self.duration.as_secs_f64(),
            if self.interrupted { "  (interrupted)" } else { "" }
        );
        let _ = writeln!(
            out,
            "{:<22}{} planned, {} sent, {} answered, {} failed, {} not sent",
            "messages", c.planned, c.sent, c.answered, c.failed, c.not_sent
        );
        let _ = writeln!(
            out,
            "{:<22}{:.1} messages/s, {:.1} tokens/s ({} tokens{})",
            "throughput",
            self.throughput.messages_per_s,
            self.throughput.tokens_per_s,
            c.tokens,
            if c.resets > 0 { format!(", {} resets", c.resets) } else { String::new() }
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<22}{:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        let mut rows = vec![
            ("time to first token", &self.latency.first_token),
            ("full reply", &self.latency.full_reply),
            ("inter-token gap", &self.latency.inter_token),
        ];
        if self.latency.session_create.count > 0 {
            rows.push(("session create", &self.latency.session_create));
        }
        rows.push(("start lag", &self.latency.start_lag));
        for (name, s) in rows {
            let _ = writeln!(
                out,
                "{name:<22}{:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
            );
        }
        let _ = writeln!(out);
        if self.errors.is_empty() {
            let _ = writeln!(out, "{:<22}none", "errors");
        } else {
            for (i, (kind, count)) in self.errors.iter().enumerate() {
                let label = if i == 0 { "errors" } else { "" };
                let _ = writeln!(out, "{label:<22}{count:>8}  {kind}");
            }
        }
        let v = &self.isolation;
        let _ = writeln!(
            out,
            "{:<22}{} (wrong echo {}, foreign marker {}, foreign session {})",
            "isolation violations",
            v.total(),
            v.wrong_echo,
            v.foreign_marker,
            v.foreign_session
        );
        let _ = writeln!(out, "{:<22}{}", "stream problems", self.stream_problems.count);
        for example in &self.stream_problems.examples {
            let _ = writeln!(out, "{:<22}  {example}", "");
        }
        let h = &self.history;
        if h.applies {
            let _ = writeln!(
                out,
                "{:<22}{} of {} sessions checked ({} skipped after errors)",
                "history problems", h.problems.count, h.checked, h.skipped
            );
            for example in &h.problems.examples {
                let _ = writeln!(out, "{:<22}  {example}", "");
            }
        } else {
            let _ = writeln!(out, "{:<22}not checked (gateway conversations only)", "history problems");
        }
        let _ = writeln!(out, "{:<22}{}", "result", if self.passed { "PASS" } else { "FAIL" });
        out
    }
}

fn target_name(kind: TargetKind) -> &'static str {
    match kind {
        TargetKind::Gateway => "gateway",
        TargetKind::Openai => "openai",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_histogram_summarizes_to_zeros() {
        assert_eq!(LatencyHistogram::default().summary(), LatencySummary::default());
    }

    #[test]
    fn latencies_beyond_an_hour_count_as_an_hour() {
        let mut histogram = LatencyHistogram::default();

        histogram.record(Duration::from_secs(7200));

        let max = histogram.summary().max_ms;
        assert!((max - 3_600_000.0).abs() / 3_600_000.0 < 0.001, "{max}");
    }
}
