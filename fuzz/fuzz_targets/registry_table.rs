//! The registry state machine under any sequence of requests and clock
//! moves: no panic, the caps hold, LOOKUP only returns live registrations.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use portico::registry::table::{Limits, Table};
use portico_wire::{decode_request, Reply};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        ttl: Duration::from_secs(30),
        max_per_name: 4,
        max_total: 16,
    };
    let mut table = Table::new(limits);
    let start = Instant::now();
    let mut now = start;
    // Datagrams separated by newlines; a leading byte < 0x20 advances time.
    for chunk in data.split(|b| *b == b'\n') {
        if let Some((&first, rest)) = chunk.split_first() {
            if first < 0x20 {
                now += Duration::from_secs(u64::from(first) * 3);
                if rest.is_empty() {
                    table.reap(now);
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
        assert!(table.len() <= limits.max_total);
    }
});
