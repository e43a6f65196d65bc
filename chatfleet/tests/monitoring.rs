//! The Prometheus alerting rules and the Grafana dashboard of `deploy/monitoring/`: the rules
//! pass `promtool check rules`, cover what an operator must hear about, and every metric the
//! rules and the dashboard query is one the code exports (named in a `telemetry.rs`).

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;
use testkit::deploy::{object, render, repo_root};

/// Every metric name the crates define: the string constants of their telemetry modules.
const TELEMETRY: [&str; 3] = [
    include_str!("../../gateway/src/telemetry.rs"),
    include_str!("../../worker/src/telemetry.rs"),
    include_str!("../../bus/src/telemetry.rs"),
];

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `chatfleet_…` metric names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("chatfleet_") {
        let tail = &rest[start..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn defined(name: &str) -> bool {
    TELEMETRY.iter().any(|source| source.contains(&format!("\"{name}\"")))
}

#[test]
fn the_alerting_rules_pass_promtool() {
    let path = repo_root().join("deploy/monitoring/alerts.yaml");

    let out = Command::new("promtool").arg("check").arg("rules").arg(&path).output().unwrap_or_else(|e| {
        panic!("promtool cannot run ({e}): run `scripts/test.sh`, which installs it (apt-get install prometheus)")
    });

    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_rules_alert_on_backlog_ownerless_partitions_errors_dead_letters_and_failover() {
    let rules = read("deploy/monitoring/alerts.yaml");
    let partitions = object(&render("nats"), "ConfigMap", "chatfleet-config")["data"]["CHATFLEET_PARTITIONS"].clone();

    for alert in [
        "ChatfleetBacklogGrowing",
        "ChatfleetPartitionWithoutOwner",
        "ChatfleetErrorRate",
        "ChatfleetDeadLetters",
        "ChatfleetFailover",
    ] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "{alert} is missing");
    }
    let partitions = partitions.as_str().unwrap();
    assert!(
        rules.contains(&format!("sum(chatfleet_worker_owned_partitions) < {partitions}\n")),
        "the ownerless-partition rule counts the deployment's {partitions} partitions"
    );
}

#[test]
fn every_metric_the_rules_and_the_dashboard_query_is_exported_by_the_code() {
    let rules = read("deploy/monitoring/alerts.yaml");
    let dashboard: Value = serde_json::from_str(&read("deploy/monitoring/grafana-dashboard.json")).unwrap();
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap())
        .collect();

    let queried: BTreeSet<String> =
        metric_names(&rules).into_iter().chain(exprs.iter().flat_map(|e| metric_names(e))).collect();

    assert!(exprs.len() >= 10, "the dashboard has its panels");
    assert!(queried.len() >= 15, "{queried:?}");
    let unknown: Vec<&String> = queried.iter().filter(|name| !defined(name)).collect();
    assert!(unknown.is_empty(), "queried but exported nowhere: {unknown:?}");
}
