#!/usr/bin/env bash
# Rolling replacement under load (issue 3): 20 s of closed-loop load (8
# keep-alive and 2 new-connection clients) while, five times, two new
# replicas register and the two old ones are deregistered and killed.
# Prints: requests ok, non-2xx, socket errors, hits per replica.
# PORTICO_ROLLING_SECS=N changes the run length.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo test --release -p portico --test rolling -- --nocapture
