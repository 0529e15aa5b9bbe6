//! The `lanyard` binary. See the `lanyard_cli` library for the commands.

use std::process::ExitCode;

use clap::Parser;
use lanyard_cli::{Cli, error_line, is_broken_pipe, run};

// ## Why mimalloc
// The exchange path allocates many short-lived buffers across tokio worker threads;
// under load glibc malloc/free took ~17% of the server's CPU (perf, docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        // `lanyard run`: the command's own exit code, nothing printed.
        Err(ref e) if let Some(x) = e.downcast_ref::<lanyard_cli::run::ExitWith>() => {
            ExitCode::from(x.0)
        }
        Err(e) => {
            lanyard_cli::output::note(&error_line(&e));
            ExitCode::FAILURE
        }
    }
}
