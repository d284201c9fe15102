//! `portico services`: what a Tower has registered, as a table or JSON.

use portico_wire::{Reply, Request};
use serde::Serialize;

use crate::cli::ServicesArgs;
use crate::config::{resolve_tower, StartupError};
use crate::registry::auth::{sign, Key};
use crate::registry::client::TowerClient;
use crate::registry::unix_ms;

#[derive(Serialize)]
struct Row {
    name: String,
    ip: String,
    port: u16,
    ttl_left_secs: u64,
}

pub async fn run(a: ServicesArgs) -> Result<(), StartupError> {
    let tower = resolve_tower(&a.tower)?;
    let client = TowerClient::new(tower, std::time::Duration::from_secs(1), 3);
    let key = a.key_file.as_deref().map(Key::load).transpose()?;
    let list = Request::List;
    let reply = match &key {
        // Signed anew for each try, so that a retry is no replay.
        Some(key) => {
            client
                .call_with(&list, || sign(key, &list, unix_ms()))
                .await?
        }
        None => client.call(&list).await?,
    };
    let (entries, total) = match reply {
        Reply::List(entries) => (entries, None),
        // The Tower's UDP replies stay small unless the LIST is signed with
        // its key (and even then end at 64 KB); the rest is on its HTTP API.
        Reply::ListPart { entries, total } => (entries, Some(total)),
        Reply::Error(e) => return Err(StartupError::TowerRefused(e)),
        other => {
            return Err(StartupError::TowerRefused(portico_wire::ErrorReply::Other(
                format!("unexpected reply {other:?}"),
            )))
        }
    };
    let entries: Vec<_> = entries
        .into_iter()
        .filter(|e| a.name.as_deref().is_none_or(|n| e.name.as_str() == n))
        .collect();
    if a.json {
        let rows: Vec<Row> = entries
            .iter()
            .map(|e| Row {
                name: e.name.to_string(),
                ip: e.addr.ip().to_string(),
                port: e.addr.port(),
                ttl_left_secs: e.ttl_left_secs,
            })
            .collect();
        let text = serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into());
        println!("{text}");
        if let Some(total) = total {
            eprintln!("{}", cut_note(total, &tower, key.is_some()));
        }
        return Ok(());
    }
    let width = entries
        .iter()
        .map(|e| e.name.as_str().len())
        .max()
        .unwrap_or(0)
        .max(7);
    println!("{:<width$}  {:<40}  TTL", "SERVICE", "ENDPOINT");
    for e in &entries {
        println!(
            "{:<width$}  {:<40}  {}s",
            e.name.as_str(),
            e.addr.to_string(),
            e.ttl_left_secs
        );
    }
    if entries.is_empty() && total.is_none() {
        println!("(no live registrations)");
    }
    if let Some(total) = total {
        eprintln!("{}", cut_note(total, &tower, key.is_some()));
    }
    Ok(())
}

/// What to say when the Tower's LIST did not fit one datagram.
fn cut_note(total: usize, tower: &std::net::SocketAddr, signed: bool) -> String {
    let why = if signed {
        "the Tower cut even the signed LIST (it has no key, or the list is over 64 KB)"
    } else {
        "the Tower cuts an unsigned LIST to 1,232 bytes (--key-file signs it)"
    };
    format!(
        "(the first entries of {total}: {why}; \
         the whole list is at http://{tower}/v1/services)"
    )
}
