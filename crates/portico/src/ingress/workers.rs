//! The ingress's worker threads, one tokio current-thread runtime each, as
//! nginx runs one process per core. A connection lives on the worker that
//! accepted it, with the backend connections it borrows: its sockets'
//! readiness comes from that worker's own epoll, and its task waits in that
//! worker's one queue, served in the order tasks became ready. What
//! outlives a request is kept per worker (`crate::worker`).
//!
//! Not tokio's work-stealing scheduler: it spills ready tasks past its
//! local queue to a shared one it visits rarely, so under saturation the
//! spilled connections wait (the long p99), and stealing moves a
//! connection between cores, away from its caches (docs/benchmarks.md).

use std::io;
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use tokio::runtime::Handle;

/// The workers started, for their busy time on `/metrics`.
static STARTED: OnceLock<Vec<Handle>> = OnceLock::new();

/// Start `count - 1` worker threads beside the calling one (worker 0,
/// whose runtime must be the current one), each running a current-thread
/// runtime until the process exits. Their handles, the current one first;
/// fewer if a thread could not start (logged: the others serve).
pub fn start(count: usize) -> Vec<Handle> {
    let mut handles = vec![Handle::current()];
    for i in 1..count.max(1) {
        match start_one(i) {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                tracing::warn!(error = %e, serving = handles.len(), "cannot start a worker thread; serving on fewer");
                break;
            }
        }
    }
    let _ = STARTED.set(handles.clone());
    handles
}

/// Time the started workers have spent running tasks, all together.
pub fn busy() -> Duration {
    STARTED.get().map_or(Duration::ZERO, |workers| {
        workers
            .iter()
            .map(|w| w.metrics().worker_total_busy_duration(0))
            .sum()
    })
}

fn start_one(i: usize) -> io::Result<Handle> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        // Linux keeps 15 bytes of a thread's name: `top -H` tells these apart.
        .name(format!("portico-w{i}"))
        .spawn(move || {
            crate::worker::set_index(i);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(runtime.handle().clone()));
            // Serves whatever is spawned on it; the process exits from
            // worker 0, once the connections are drained.
            runtime.block_on(std::future::pending::<()>());
        })?;
    rx.recv()
        .map_err(|_| io::Error::other("the worker thread ended before its runtime started"))?
}
