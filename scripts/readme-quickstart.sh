#!/usr/bin/env bash
# The README's first command, run as a newcomer would on a fresh clone: the
# `cargo run` line of its first code block, taken from the README itself so
# the two cannot drift apart. It must start, answer 503 for a service nobody
# registered, and route once a backend registers the seed's way.
#
#   scripts/readme-quickstart.sh            # exactly as typed (a release build)
#   scripts/readme-quickstart.sh --debug    # the same line without --release (CI:
#                                           # the tests have built it already)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

line="$(awk '/^```/{n++; next} n==1 && /^cargo run /{print; exit}' README.md)"
[[ -n $line ]] || { echo "quickstart: no 'cargo run' line in README.md's first code block" >&2; exit 1; }
[[ ${1:-} == --debug ]] && line="${line/ --release/}"
port="$(sed -n 's/.*--listen \([0-9]*\).*/\1/p' <<<"$line")"
service="$(sed -n 's/.*--route \/:\([A-Za-z0-9_-]*\).*/\1/p' <<<"$line")"
[[ -n $port && -n $service ]] || { echo "quickstart: cannot read --listen PORT and --route /:SERVICE from: $line" >&2; exit 1; }
echo "quickstart: $line"

scratch="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

# shellcheck disable=SC2086 # the README's words, split as a shell splits them
bash -c "exec $line" >"$scratch/portico.log" 2>&1 &
pids+=($!)

# Waits are on a condition with a deadline (a release build may take minutes).
wait_for() { # SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        if ((SECONDS > deadline)) || ! kill -0 "${pids[0]}" 2>/dev/null; then
            echo "quickstart: gave up waiting for $what; its log:" >&2
            tail -n 30 "$scratch/portico.log" >&2
            exit 1
        fi
        sleep 0.2
    done
}
status() { curl -s -o "$scratch/body" -w '%{http_code}' "http://127.0.0.1:$port/" || true; }

wait_for 900 "the ingress on port $port" bash -c "[[ \$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$port/) != 000 ]]"
code="$(status)"
[[ $code == 503 ]] || { echo "quickstart: expected 503 before registering, got $code" >&2; exit 1; }

mkdir -p "$scratch/www"
echo 'skr8tr ingress works!' >"$scratch/www/index.html"
backend_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
python3 -m http.server "$backend_port" --bind 127.0.0.1 --directory "$scratch/www" >/dev/null 2>&1 &
pids+=($!)
wait_for 30 "the backend" bash -c "curl -s -o /dev/null http://127.0.0.1:$backend_port/"
printf 'REGISTER|%s|127.0.0.1|%s' "$service" "$backend_port" >/dev/udp/127.0.0.1/7772
wait_for 30 "the route to the registered backend" bash -c "[[ \$(curl -s http://127.0.0.1:$port/) == 'skr8tr ingress works!' ]]"
echo "quickstart: 503 before registering, 200 after: the README's first command works"
