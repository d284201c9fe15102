//! The Tower: the registry table, its UDP server, and a client for it.

pub mod client;
pub mod table;
pub mod udp;

use std::sync::{Arc, Mutex, MutexGuard};

pub use table::{Limits, Table};

/// The one table shared by the UDP server, the reaper and (in `portico up`)
/// the embedded ingress. The lock is held only for the table's pure,
/// allocation-light operations, never across I/O.
#[derive(Debug, Clone)]
pub struct Registry {
    table: Arc<Mutex<Table>>,
}

impl Registry {
    pub fn new(limits: Limits) -> Self {
        Self {
            table: Arc::new(Mutex::new(Table::new(limits))),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-changed
        // (every method finishes its writes before returning), so a poisoned
        // lock is still safe to use.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}
