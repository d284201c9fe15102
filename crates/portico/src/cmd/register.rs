//! `portico register`: keep one registration alive with heartbeats every
//! TTL/3, optionally while a command runs; deregister on the way out.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use portico_wire::{ErrorReply, Registration, Reply, Request, ServiceName};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::RegisterArgs;
use crate::config::{resolve_tower, StartupError};
use crate::registry::auth::{sign, Key};
use crate::registry::client::TowerClient;
use crate::registry::unix_ms;

pub async fn run(a: RegisterArgs) -> Result<ExitCode, StartupError> {
    let name = ServiceName::parse(&a.name).map_err(|e| StartupError::Flag {
        flag: "--name",
        value: a.name.clone(),
        why: e.to_string(),
    })?;
    let ip: IpAddr = a.ip.parse().map_err(|_| StartupError::Flag {
        flag: "--ip",
        value: a.ip.clone(),
        why: "expected an IPv4 or IPv6 address".into(),
    })?;
    if a.port == 0 {
        return Err(StartupError::Flag {
            flag: "--port",
            value: "0".into(),
            why: "the replica's real port is needed".into(),
        });
    }
    let tower = resolve_tower(&a.tower)?;
    let client = TowerClient::new(tower, Duration::from_secs(1), 3);
    let key = a.key_file.as_deref().map(Key::load).transpose()?;
    let writer = Writer { client, key };
    let registration = Registration {
        name,
        addr: SocketAddr::new(ip, a.port),
    };
    let mut term = signal(SignalKind::terminate()).map_err(StartupError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartupError::Runtime)?;

    let mut child =
        match a.command.split_first() {
            Some((program, args)) => {
                let child = Command::new(program).args(args).spawn().map_err(|source| {
                    StartupError::Spawn {
                        command: a.command.join(" "),
                        source,
                    }
                })?;
                Some(child)
            }
            None => None,
        };
    if let Some(c) = child.as_mut() {
        // Register only once the replica can take traffic.
        tokio::select! {
            ready = wait_listening(registration.addr, a.ready_timeout) => if !ready {
                tracing::warn!(addr = %registration.addr, "command is not accepting connections after {:?}; registering anyway", a.ready_timeout);
            },
            status = c.wait() => return Ok(exit_code(status.ok())),
            _ = term.recv() => return Ok(stop_child(c).await),
            _ = int.recv() => return Ok(stop_child(c).await),
        }
    }

    let period = (a.ttl / 3).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registered: Option<bool> = None;
    let code = loop {
        tokio::select! {
            _ = tick.tick() => heartbeat(&writer, &registration, &mut registered).await,
            status = wait_child(&mut child) => break exit_code(status),
            _ = term.recv() => break match child.as_mut() {
                Some(c) => stop_child(c).await,
                None => ExitCode::SUCCESS,
            },
            _ = int.recv() => break match child.as_mut() {
                Some(c) => stop_child(c).await,
                None => ExitCode::SUCCESS,
            },
        }
    };
    match writer.send(Request::Deregister(registration.clone())).await {
        Ok(Reply::Deregistered(_)) | Ok(Reply::Error(ErrorReply::NotFound(_))) => {
            tracing::info!(name = %registration.name, addr = %registration.addr, "deregistered");
        }
        Ok(other) => tracing::warn!(?other, "unexpected reply to DEREGISTER"),
        Err(e) => tracing::warn!("could not deregister: {e}; the entry expires by its TTL"),
    }
    Ok(code)
}

/// Sends writes to the Tower, signed when there is a key.
struct Writer {
    client: TowerClient,
    key: Option<Key>,
}

impl Writer {
    async fn send(&self, request: Request) -> Result<Reply, crate::registry::client::TowerError> {
        match &self.key {
            Some(key) => {
                self.client
                    .call_with(&request, || sign(key, &request, unix_ms()))
                    .await
            }
            None => self.client.call(&request).await,
        }
    }
}

async fn heartbeat(writer: &Writer, r: &Registration, registered: &mut Option<bool>) {
    let client = &writer.client;
    let ok = match writer.send(Request::Register(r.clone())).await {
        Ok(Reply::Registered(_)) => true,
        Ok(Reply::Error(e)) => {
            if *registered != Some(false) {
                tracing::warn!("the Tower refused the registration: {e}");
            }
            false
        }
        Ok(other) => {
            tracing::warn!(?other, "unexpected reply to REGISTER");
            false
        }
        Err(e) => {
            if *registered != Some(false) {
                tracing::warn!("{e}; retrying every heartbeat");
            }
            false
        }
    };
    if ok && *registered != Some(true) {
        tracing::info!(name = %r.name, addr = %r.addr, tower = %client.addr(), "registered");
    }
    *registered = Some(ok);
}

async fn wait_child(child: &mut Option<Child>) -> Option<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await.ok(),
        None => std::future::pending().await,
    }
}

/// Pass SIGTERM on and wait for the command; SIGKILL after 30 s.
async fn stop_child(child: &mut Child) -> ExitCode {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(status) => exit_code(status.ok()),
        Err(_) => {
            tracing::warn!("command ignored SIGTERM for 30 s; killing it");
            let _ = child.kill().await;
            exit_code(child.wait().await.ok())
        }
    }
}

fn exit_code(status: Option<std::process::ExitStatus>) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = match status {
        Some(s) => s
            .code()
            .or_else(|| s.signal().map(|sig| 128 + sig))
            .unwrap_or(1),
        None => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Whether `addr` accepts TCP connections within `timeout`.
async fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
