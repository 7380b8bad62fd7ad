#!/usr/bin/env bash
# Starts `omnistage serve` (the embedded default) on a free port with a throw-away cache, waits for
# /health, runs the openai client check against it, and stops the server.
# Usage: scripts/serve-and-check.sh [path/to/omnistage]
set -euo pipefail
bin=${1:-target/debug/omnistage}
port=${PORT:-18000}
cache=$(mktemp -d)
log=$(mktemp)
OMNISTAGE_CACHE="$cache" "$bin" serve --port "$port" >"$log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$cache"; }
trap cleanup EXIT
for _ in $(seq 1 300); do
  if curl -sf "http://127.0.0.1:$port/health" >/dev/null; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then echo "server exited:"; cat "$log"; exit 1; fi
  sleep 0.2
done
curl -sf "http://127.0.0.1:$port/health" || { echo "server never became ready:"; cat "$log"; exit 1; }
echo
python3 "$(dirname "$0")/openai_client_check.py" --base-url "http://127.0.0.1:$port/v1"
