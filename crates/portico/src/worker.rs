//! Which worker thread the caller is, and state kept one share per worker.
//! A worker's sockets are watched by its own event loop; a socket one
//! worker opened and another used would wake the user across threads on
//! every read, behind the opener's queue. So what outlives a request (the
//! backend pool, the Tower's UDP sockets) is kept per worker, picked by
//! `index`. `ingress::workers` sets it on the threads it starts; the main
//! thread is worker 0. (leaf)

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The calling thread's worker number (0 off the worker threads).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Make the calling thread worker `i`.
pub fn set_index(i: usize) {
    INDEX.with(|index| index.set(i));
}

/// One `T` per worker thread.
#[derive(Debug)]
pub struct PerWorker<T> {
    shares: Box<[T]>,
}

impl<T> PerWorker<T> {
    pub fn new(workers: usize, share: impl FnMut() -> T) -> Self {
        Self {
            shares: std::iter::repeat_with(share).take(workers.max(1)).collect(),
        }
    }

    /// The calling worker's share. With fewer shares than workers (a
    /// client built for one thread, as the command-line tools are), the
    /// workers share them round the count, never out of range.
    pub fn mine(&self) -> &T {
        &self.shares[index() % self.shares.len()]
    }
}

/// Shares behind locks: each is only ever held for a quick look, so a
/// panic while one was held leaves nothing half-done worth refusing.
impl<T> PerWorker<Mutex<T>> {
    /// The calling worker's share, locked.
    pub fn lock_mine(&self) -> MutexGuard<'_, T> {
        relock(self.mine())
    }

    /// Every worker's share in turn, each locked while it is looked at.
    pub fn lock_each(&self) -> impl Iterator<Item = MutexGuard<'_, T>> {
        self.shares.iter().map(relock)
    }
}

fn relock<T>(share: &Mutex<T>) -> MutexGuard<'_, T> {
    share.lock().unwrap_or_else(|p| p.into_inner())
}
