//! Protocols end to end: WebSocket through the ingress with a real client
//! and server (tokio-tungstenite), HTTP/2 and TLS with curl, gRPC, and the
//! RFC 9110/9112 corner cases.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server: text and binary frames come back as sent.
async fn websocket_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                // Other frames (Close among them) need no echo: tungstenite
                // queues the close reply itself and sends it on the next
                // read, which then ends the stream.
                while let Some(Ok(msg)) = ws.next().await {
                    let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                    if echo && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn websocket_echo_through_the_ingress() {
    let t = tower("30s");
    let (echo, _task) = websocket_echo().await;
    register(t.addr, "ws", echo);
    let web = Backend::start("web").await;
    register(t.addr, "web", web.addr);
    let ing = ingress(t.addr, &["/ws:ws", "/:web"], &[]);
    wait_synced(&ing, 1).await;

    let stream = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let url = format!("ws://{}/ws/chat", ing.addr);
    let (mut ws, resp) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello through portico"))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello through portico")
    );
    let blob: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();
    // The server's close frame comes back, then the stream ends.
    let mut seen = Vec::new();
    while let Some(msg) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {
        seen.push(format!("{msg:?}"));
    }
    assert!(
        seen.iter().any(|m| m.contains("Close")),
        "clean close handshake: {seen:?}"
    );
    // Plain requests still route as before.
    assert_eq!(get(ing.addr, "/").await.headers["x-backend"], "web");
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let t = tower("30s");
    let (echo, _task) = websocket_echo().await;
    register(t.addr, "ws", echo);
    let ing = ingress(t.addr, &["/:ws"], &["--idle-timeout", "300ms"]);
    wait_synced(&ing, 1).await;
    let stream = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/", ing.addr), stream)
        .await
        .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("x"));
    let started = std::time::Instant::now();
    // Nothing more is sent: the tunnel ends at the idle timeout.
    let end = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("tunnel never closed");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))));
    assert!(started.elapsed() >= Duration::from_millis(250));
}
