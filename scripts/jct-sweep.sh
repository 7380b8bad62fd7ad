#!/usr/bin/env bash
# Regenerates the JCT comparison in benches/README.md: builds the release binary, serves the
# embedded default twice — pipelined (port 18200) and --monolithic (port 18201, one request at a
# time, every stage unbatched) — sweeps the same seeded text+image workload over offered loads on
# each (one after the other, so they never compete for the CPU), and plots both curves.
# Usage: scripts/jct-sweep.sh [OUT_DIR] (default target/jct: per-request results run to ~20 MB;
# benches/results/ keeps the two sweep.json files, the compare table and the chart)
# Environment: RATES (default 4,8,12,14,16,17,18,19,20,22,24: dense around where the baseline
# saturates on the 2-core dev machine), COUNT per load (300), MIX (text=1,image=1; add
# speech=1 for chats with text + audio out through thinker → talker → codec).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/jct}
rates=${RATES:-4,8,12,14,16,17,18,19,20,22,24}
count=${COUNT:-300}
mix=${MIX:-text=1,image=1}
cargo build --release --bin omnistage
bin=target/release/omnistage
cache=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$cache"; }
trap cleanup EXIT
wait_ready() {
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.2; done
  echo "server on port $1 never became ready" >&2; exit 1
}
# The first server makes the tiny checkpoints in the cache; the second starts once they exist.
OMNISTAGE_CACHE="$cache" "$bin" serve --port 18200 >"$cache/pipelined.log" 2>&1 & pids+=($!)
wait_ready 18200
OMNISTAGE_CACHE="$cache" "$bin" serve --monolithic --port 18201 >"$cache/monolithic.log" 2>&1 & pids+=($!)
wait_ready 18201
common=(--mix "$mix" --count "$count" --seed 42 --sweep "rates=$rates" --quiet)
mkdir -p "$out"
"$bin" bench --url http://127.0.0.1:18200 --label pipelined "${common[@]}" --out "$out/pipelined"
"$bin" bench --url http://127.0.0.1:18201 --label monolithic "${common[@]}" --out "$out/monolithic"
"$bin" bench plot --out "$out" "$out/pipelined/sweep.json" "$out/monolithic/sweep.json" | tee "$out/compare.txt"
