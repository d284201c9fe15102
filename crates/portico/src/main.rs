//! The `portico` binary: parse flags, set up logging and the runtime, run
//! the subcommand, and turn a startup error into one line and exit code 1.

use std::io::IsTerminal;
use std::process::ExitCode;

use std::collections::HashSet;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use portico::cli::{Cli, LogFormat};

// Every request allocates a few blocks over glibc's per-thread cache limit
// (1 KiB): the read buffers (8 KiB) of both connections and the request's
// future (3 KiB). glibc serves those from its general bins, a slow path
// taken several times per request; mimalloc from per-thread size classes.
// Transparent huge pages are off (the `no_thp` feature): with them every
// idle connection holds more memory, and idle connections are what a
// proxy holds most of. Figures in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // Flags given on the command line win over the config file; a default
    // does not. Clap knows which is which.
    let explicit: HashSet<String> = matches
        .subcommand()
        .map(|(_, sub)| {
            sub.ids()
                .filter(|id| sub.value_source(id.as_str()) == Some(ValueSource::CommandLine))
                .map(|id| id.to_string())
                .collect()
        })
        .unwrap_or_default();
    init_tracing(&cli.log_level, cli.log_format);
    raise_fd_limit();

    // The main thread's runtime is the ingress's first worker; the
    // ingress starts the others (`ingress::workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portico: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(portico::cmd::run(cli.command, explicit)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portico: {}", portico::error_chain::chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Every proxied connection holds two descriptors; the usual soft limit of
/// 1024 would cap us near 500 clients. Raise it to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
