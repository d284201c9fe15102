#!/usr/bin/env bash
# Portico's benchmark, one command: installs wrk, nginx (with its Brotli
# filter), HAProxy, h2load, openssl and ss from apt when missing, builds
# Portico and the load generator (release), and runs bench.py, which
# measures Portico, nginx, HAProxy and no proxy ("direct") side by side and
# writes results.json, summary.md and chart.svg.
#
#   bench/run.sh                 # the full run (about 13 minutes on 2 cores)
#   bench/run.sh --publish       # ... and copy summary.md and chart.svg to docs/bench/
#   bench/run.sh --smoke         # a minute: checks the benchmark works (CI); debug build
#   bench/run.sh --rounds 3 ...  # any option of bench.py (bench/bench.py --help)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
for tool in wrk nginx haproxy taskset ss h2load openssl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# The compression cell's nginx compresses with Brotli through this module.
[[ -e /usr/lib/nginx/modules/ngx_http_brotli_filter_module.so ]] ||
    missing+=(libnginx-mod-http-brotli-filter)
if ((${#missing[@]})); then
    pkgs=("${missing[@]/taskset/util-linux}")
    pkgs=("${pkgs[@]/#ss/iproute2}")
    pkgs=("${pkgs[@]/#h2load/nghttp2-client}")
    echo "installing: ${pkgs[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

publish=0
profile=release
args=()
for a in "$@"; do
    case "$a" in
        --publish) publish=1 ;;
        --smoke)
            profile=debug
            args+=(--duration 1 --warmup 1 --conns 50 --rate 1000 --idle-conns 300
                   --idle-hold 0.5 --churn-pairs 1 --latency-rounds 1
                   --discovery-sizes 1000 --discovery-ingresses 2 --discovery-changes 20
                   --discovery-idle-windows 1 --discovery-route-tries 3
                   --discovery-heartbeat-seconds 1 --tls-conns 10 --h2-conns 10
                   --h2-streams 4) ;;
        *) args+=("$a") ;;
    esac
done

if [[ $profile == release ]]; then
    cargo build --release --locked -p portico -p portico-loadgen >&2
else
    cargo build --locked -p portico -p portico-loadgen >&2
fi
# Where cargo put them: CARGO_TARGET_DIR or build.target-dir may move it
# out of the checkout, and cargo metadata is how cargo itself says where.
target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
out="bench/results/$(date -u +%Y%m%d-%H%M%S)"
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ ${args[$i]} == --out ]] && out=${args[$((i + 1))]}
done
BENCH_COMMAND="bash bench/run.sh $*" python3 bench/bench.py --out "$out" --portico "$target_dir/$profile/portico" \
    --loadgen "$target_dir/$profile/portico-loadgen" "${args[@]}"
echo "results in $out" >&2
if ((publish)); then
    mkdir -p docs/bench
    cp "$out/summary.md" docs/bench/latest.md
    cp "$out/chart.svg" docs/bench/latest.svg
    cp "$out/results.json" docs/bench/latest.json
    echo "published to docs/bench/" >&2
fi
