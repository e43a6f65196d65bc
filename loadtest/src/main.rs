//! The `chatfleet-loadtest` binary: raises the open-files limit, parses the command line and
//! runs the scenario until it ends or Ctrl-C. Everything else lives in the library, which the
//! tests drive the same way.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if let Err(error) = chatfleet_loadtest::raise_open_files_limit() {
        eprintln!("chatfleet-loadtest: warning: cannot raise the open-files limit: {error}");
    }
    let cli = chatfleet_loadtest::cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("chatfleet-loadtest: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let interrupted = async {
        // Without a signal handler the run simply cannot be interrupted early; it still ends.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match runtime.block_on(chatfleet_loadtest::execute(&cli, interrupted)) {
        Ok(true) => ExitCode::SUCCESS,
        // Errors, violations or problems: the summary above says which.
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            // One clear line, never a backtrace: bad settings or an unreachable target.
            eprintln!("chatfleet-loadtest: {error:#}");
            ExitCode::from(2)
        }
    }
}
