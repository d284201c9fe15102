#!/usr/bin/env bash
# Fuzz every target for SECONDS each (default 30), from the committed seed
# corpus (copied, so new inputs do not dirty the tree). A crash fails the
# run and leaves its input in fuzz/artifacts/TARGET/: add it to the corpus
# as regression-NAME once fixed.
#
# Coverage-guided libFuzzer on stable Rust: the same instrumentation
# `cargo fuzz build --sanitizer none` uses, without needing cargo-fuzz or
# a nightly compiler (AddressSanitizer needs nightly; the code is
# forbid(unsafe), so panics and assertion failures are what is hunted).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
seconds="${1:-30}"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# With an explicit --target, RUSTFLAGS reach only the fuzzed code, not
# build scripts (which would fail to link the coverage hooks).
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --bins --quiet --target "$host"
# CARGO_TARGET_DIR or build.target-dir may put the build outside fuzz/;
# cargo metadata says where cargo itself looks.
target_dir="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in wire_decode registry_table route_match header_rewrite h1_response proxy_header compress_head stream_line h1_differential; do
    cp -r "corpus/$target" "$scratch/$target"
    mkdir -p "artifacts/$target"
    echo "fuzz: $target for ${seconds}s"
    "$target_dir/$host/release/$target" "$scratch/$target" -max_total_time="$seconds" \
        -artifact_prefix="artifacts/$target/" -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
        | grep -E "^(Done|stat::number_of_executed_units)|panicked|ERROR|SUMMARY" || true
    if compgen -G "artifacts/$target/crash-*" >/dev/null; then
        echo "fuzz: $target crashed; input kept in fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
echo "fuzz: no crash"
