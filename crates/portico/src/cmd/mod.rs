//! Composition roots, one per subcommand: validated config -> build the
//! parts -> run -> await shutdown.

pub mod ingress;
pub mod register;
pub mod services;
pub mod tower;
pub mod up;

use std::process::ExitCode;

use tokio::sync::watch;

use crate::cli::Command;
use crate::config::StartupError;

pub async fn run(command: Command) -> Result<ExitCode, StartupError> {
    match command {
        Command::Ingress(a) => ingress::run(a, shutdown_signal())
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Tower(a) => tower::run(a, shutdown_signal())
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Up(a) => up::run(a, shutdown_signal())
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Register(a) => register::run(a).await,
        Command::Services(a) => services::run(a).await.map(|()| ExitCode::SUCCESS),
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
