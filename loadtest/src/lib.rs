//! chatfleet-loadtest: a load generator for chatfleet gateways and, as a baseline, for any
//! OpenAI-compatible endpoint.
//!
//! [`plan`] decides what a run does, [`runner`] does it with [`client`] and gathers a
//! [`report::Report`], which prints as the summary table, as JSON and, through [`chart`], as an
//! SVG chart. [`isolation`] holds the checks that each reply belonged to its user. [`webhooks`]
//! is the webhooks scenario: signed conversations through a gateway's webhook channel to their
//! signed deliveries at a receiver it runs, with a report of its own. The binary
//! only parses the command line and calls [`execute`].

pub mod chart;
pub mod cli;
pub mod client;
pub mod isolation;
pub mod plan;
pub mod report;
pub mod runner;
pub mod webhooks;

use std::future::Future;
use std::io::IsTerminal;

use anyhow::Context;

pub use report::Report;
pub use runner::{RunConfig, run};

/// Runs the command line's scenario, prints the summary on stdout and writes the files it asks
/// for. Returns whether the run passed; errors only when it could not run or report.
pub async fn execute(cli: &cli::Cli, shutdown: impl Future<Output = ()>) -> anyhow::Result<bool> {
    if let Some(config) = cli.webhook_config()? {
        let report = webhooks::run(&config, shutdown).await?;
        print!("{}", report.summary_table());
        if let Some(path) = &cli.options.json {
            let json = report.to_json().context("cannot encode the report as JSON")?;
            std::fs::write(path, json).with_context(|| format!("cannot write the report to {}", path.display()))?;
        }
        return Ok(report.passed);
    }
    let config = cli.run_config(std::io::stderr().is_terminal())?;
    warn_about_open_files(&config);
    let report = run(&config, shutdown).await?;
    print!("{}", report.summary_table());
    if let Some(path) = &cli.options.json {
        let json = report.to_json().context("cannot encode the report as JSON")?;
        std::fs::write(path, json).with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if let Some(path) = &cli.options.svg {
        chart::write_svg(&report, path)?;
    }
    Ok(report.passed)
}

/// Raises the soft limit on open files to the hard limit, and returns the limit in force.
///
/// Every concurrent stream holds a socket, and the default soft limit (often 1024) would fail
/// a run of ten thousand users with "too many open files" long before the target is loaded.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Says on stderr when the open-files limit is below the users a run may hold at once.
fn warn_about_open_files(config: &RunConfig) {
    let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else { return };
    // A ramp's concurrency depends on the target's speed; its user count is the worst case.
    let users = config.scenario.users();
    // A few descriptors go to the runtime, stdio and the output files.
    if soft < users.saturating_add(64) {
        eprintln!(
            "chatfleet-loadtest: warning: the open-files limit is {soft}, below the {users} connections this run may \
             hold at once; raise the hard limit (ulimit -Hn) if connections fail"
        );
    }
}
