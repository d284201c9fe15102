//! Composition roots, one per subcommand: validated config -> build the
//! parts -> run -> await shutdown.

pub mod ingress;
pub mod register;
pub mod services;
pub mod tower;
pub mod up;

use std::collections::HashSet;
use std::process::ExitCode;

use tokio::sync::watch;

use crate::cli::Command;
use crate::config::StartupError;

/// `explicit` holds the flags (by field name) given on the command line.
pub async fn run(command: Command, explicit: HashSet<String>) -> Result<ExitCode, StartupError> {
    let explicit = move |field: &str| explicit.contains(field);
    let done = |r: Result<(), StartupError>| r.map(|()| ExitCode::SUCCESS);
    match command {
        Command::Ingress(a) => done(ingress::run(a, &explicit, shutdown_signal()).await),
        Command::Tower(a) => done(tower::run(a, shutdown_signal()).await),
        Command::Up(a) => done(up::run(a, &explicit, shutdown_signal()).await),
        Command::Register(a) => register::run(a).await,
        Command::Services(a) => done(services::run(a).await),
    }
}

/// Flips to true on the first SIGTERM or SIGINT; a second one exits at once,
/// for an operator who does not want to wait for the drain.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            tracing::error!("cannot install the SIGTERM handler; stop with SIGKILL");
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if n > 0 {
                tracing::warn!("second signal: exiting without waiting");
                std::process::exit(130);
            }
            tracing::info!("signal received: shutting down");
            let _ = tx.send(true);
        }
    });
    rx
}
