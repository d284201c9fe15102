#!/usr/bin/env bash
# The soak (issue 6): 10 minutes of mixed load (keep-alive and new
# connections, uploads, WebSockets) with replicas churning every 5 s and one
# backend killed outright every 30 s. Prints requests, non-2xx, socket
# errors, the ingress's peak RSS and its open descriptors at start and end.
# PORTICO_SOAK_SECS=N changes the length.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo test --release -p portico --test soak -- --ignored --nocapture
