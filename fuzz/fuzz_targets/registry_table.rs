//! The registry state machine under any sequence of requests and clock
//! moves: no panic, the caps hold, LOOKUP only returns live registrations,
//! and the changes it records (a change stream's lines) carry one index
//! each, with no gap, and replayed give the table's set once it is reaped.
#![no_main]
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use portico::registry::table::{Limits, Table};
use portico::services_doc::Change;
use portico_wire::{decode_request, Reply, ServiceName};

/// Apply the table's recorded changes to `seen`, checking their indexes.
fn replay(table: &mut Table, seen: &mut BTreeSet<(ServiceName, SocketAddr)>, last: &mut u64) {
    for (index, change) in table.drain_changes() {
        assert_eq!(index, *last + 1, "change indexes have no gap");
        *last = index;
        match change {
            Change::Add { service, addr, .. } => {
                seen.insert((service, addr));
            }
            Change::Remove { service, addr } => {
                assert!(seen.remove(&(service, addr)), "a remove of what was added");
            }
            Change::Warm => {}
        }
    }
    assert_eq!(table.revision(), *last);
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        ttl: Duration::from_secs(30),
        max_per_name: 4,
        max_total: 16,
    };
    let mut table = Table::new(limits);
    let start = Instant::now();
    let mut now = start;
    let mut seen = BTreeSet::new();
    let mut last = 0;
    // Datagrams separated by newlines; a leading byte < 0x20 advances time.
    for chunk in data.split(|b| *b == b'\n') {
        if let Some((&first, rest)) = chunk.split_first() {
            if first < 0x20 {
                now += Duration::from_secs(u64::from(first) * 3);
                if rest.is_empty() {
                    table.reap(now);
                    replay(&mut table, &mut seen, &mut last);
                    let live: BTreeSet<_> =
                        table.list(now).into_iter().map(|e| (e.name, e.addr)).collect();
                    assert_eq!(seen, live, "the changes replayed give the table");
                    continue;
                }
            }
        }
        if let Ok(req) = decode_request(chunk) {
            let reply = table.handle(req, now);
            if let Reply::Lookup(r) = &reply {
                assert!(table
                    .list(now)
                    .iter()
                    .any(|e| e.addr == r.addr && e.name == r.name));
            }
        }
        replay(&mut table, &mut seen, &mut last);
        assert!(table.len() <= limits.max_total);
    }
});
