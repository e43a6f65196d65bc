//! The `chatfleet` binary: parses the command line and runs the chosen role until SIGINT or
//! SIGTERM. Everything else lives in the library, which the tests drive the same way.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = chatfleet::cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chatfleet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let traces = match chatfleet::traces::Traces::init(cli.role(), runtime.handle().clone()) {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("chatfleet: {e}");
            return ExitCode::from(2);
        }
    };
    chatfleet::telemetry::init_logging(cli.log_format(), &traces);
    let code = match runtime.block_on(chatfleet::run(cli, chatfleet::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line, never a backtrace: the error names the setting at fault.
            eprintln!("chatfleet: {e:#}");
            ExitCode::from(2)
        }
    };
    // While the runtime still runs the exporter's requests.
    traces.shutdown();
    code
}
