#!/usr/bin/env bash
# Regenerates the speech table in benches/README.md: time to first audio packet (TTFP) and
# real-time factor (RTF) of streamed chat with text + audio out on the embedded tiny-omni graph
# (thinker → talker → SNAC codec), served twice from the same checkpoints — with its streamed
# edges (port 18300), and with every edge delivering only when its producer finishes (port 18301,
# the same TOML without its `stream` lines) — at concurrency 1 and 8, one run after the other.
# Every request is 64 text tokens and exactly FRAMES codec frames of speech (the talker's end
# token masked), so both servers do the same work; the tiny SNAC frame is 128 samples at 24 kHz.
# Usage: scripts/speech-bench.sh [OUT_DIR] (default benches/results/speech)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benches/results/speech}
count=${COUNT:-32}
frames=${FRAMES:-200}
export OMNISTAGE_STAGE__TALKER__SAMPLING__MAX_TOKENS=$((frames * 7))
export OMNISTAGE_STAGE__TALKER__SAMPLING__IGNORE_EOS=true
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
OMNISTAGE_CACHE="$cache" "$bin" serve --port 18300 >"$cache/streamed.log" 2>&1 & pids+=($!)
wait_ready 18300
# Beside the checkpoints the first server made, so its relative model paths resolve.
sed '/^stream = /d' deploy/tiny-omni.toml >"$cache/tiny-omni-unstreamed.toml"
"$bin" serve "$cache/tiny-omni-unstreamed.toml" --port 18301 >"$cache/unstreamed.log" 2>&1 & pids+=($!)
wait_ready 18301
mkdir -p "$out"
for c in 1 8; do
  for run in streamed:18300 unstreamed:18301; do
    label=${run%%:*}; port=${run##*:}
    "$bin" bench --url "http://127.0.0.1:$port" --label "$label-c$c" --mix speech=1 \
      --concurrency "$c" --count "$count" --max-tokens 64 --seed 42 --quiet \
      --out "$out/$label-c$c" | tee "$out/$label-c$c.txt"
  done
done
