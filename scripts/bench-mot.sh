#!/usr/bin/env bash
# Mixture-of-Thoughts requests (k = 2 and 3 experts collaborating) against routing alone (k = 1:
# the router's top expert answers by itself) on the tiny MoT graph (deploy/tiny-mot.toml), at
# closed-loop concurrency 1 and 8, one server, same seeded text workload for every k. Also reads
# the time MoT primaries waited at stack boundaries for their peers' states from /metrics
# (omnistage_mot_boundary_wait_seconds_total, per expert stage) before and after each run.
# Regenerates the "Mixture of Thoughts" table in benches/README.md.
#
# k values are run in rotated order in each of ROUNDS rounds (noise on a shared machine hits all
# alike); results are pooled per (k, concurrency).
#
# Usage: scripts/bench-mot.sh [OUT_DIR] (default benches/results/mot)
# Environment: ROUNDS (3), COUNT (48), MAX_TOKENS (32), PROMPT_WORDS (24), SEED (42),
# SET (tiny: the 32/48/64-wide experts of the tests; bench: 256/384/512 wide, 4/6/8 layers —
# `make-tiny --mot --mot-set bench`), BUILD (0: use target/release/omnistage as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benches/results/mot}
rounds=${ROUNDS:-3}
count=${COUNT:-48}
max_tokens=${MAX_TOKENS:-32}
prompt_words=${PROMPT_WORDS:-24}
seed=${SEED:-42}
set_name=${SET:-tiny}
[ "${BUILD:-1}" = 0 ] || cargo build --release --bin omnistage
bin=target/release/omnistage
work=$(mktemp -d)
mkdir -p "$out" "$work/raw"
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" make-tiny --out "$work" --mot --mot-set "$set_name" >/dev/null
cp deploy/tiny-mot.toml "$work/"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" serve "$work/tiny-mot.toml" --port "$port" >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.2
done
wait_metric() { # name: sum of every series of the metric
  curl -s "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 ~ "^"m"(\\{|$)" {s += $2} END {printf "%.6f\n", s}'
}

{ echo "set: $set_name"; echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"; nproc; } >"$out/machine.txt"
ks=(1 2 3)
for r in $(seq 1 "$rounds"); do
  for c in 1 8; do
    for i in 0 1 2; do
      k=${ks[$(( (i + r) % 3 ))]}
      name="k$k-c$c-r$r"
      w0=$(wait_metric omnistage_mot_boundary_wait_seconds_total)
      b0=$(wait_metric omnistage_mot_boundaries_total)
      "$bin" bench --url "http://127.0.0.1:$port" --label "k$k" --mix text=1 --count "$count" \
        --concurrency "$c" --seed "$seed" --max-tokens "$max_tokens" --prompt-words "$prompt_words" \
        --extra-body "{\"router_k\": $k}" --quiet --out "$work/raw/$name" >"$work/raw/$name.txt"
      w1=$(wait_metric omnistage_mot_boundary_wait_seconds_total)
      b1=$(wait_metric omnistage_mot_boundaries_total)
      echo "{\"wait_s\": $(python3 -c "print($w1 - $w0)"), \"boundaries\": $(python3 -c "print($b1 - $b0)")}" \
        >"$work/raw/$name/boundaries.json"
      jq 'del(.requests)' "$work/raw/$name/results.json" >"$out/$name.json"
      cp "$work/raw/$name/boundaries.json" "$out/$name.boundaries.json"
      echo "round $r c=$c k=$k: $(grep -m1 makespan "$work/raw/$name.txt")"
    done
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"

python3 - "$work/raw" "$out" "$rounds" <<'PY'
import json, os, sys
raw, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def pct(v, q):
    v = sorted(v); k = q / 100 * (len(v) - 1); lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)
res = {}
for c in (1, 8):
    for k in (1, 2, 3):
        runs = [json.load(open(os.path.join(raw, f"k{k}-c{c}-r{r}", "results.json"))) for r in range(1, rounds + 1)]
        bnd = [json.load(open(os.path.join(raw, f"k{k}-c{c}-r{r}", "boundaries.json"))) for r in range(1, rounds + 1)]
        reqs = [q for run in runs for q in run["requests"] if q["outcome"] == "ok"]
        errors = sum(1 for run in runs for q in run["requests"] if q["outcome"] != "ok")
        jct = [q["jct_ms"] for q in reqs]
        ttft = [q["ttft_ms"] for q in reqs if q.get("ttft_ms") is not None]
        sums = [s for run in runs for s in run["summary"] if s["kind"] == "all"]
        res[f"k{k}-c{c}"] = {
            "ok": len(reqs), "errors": errors,
            "jct_mean_ms": sum(jct) / len(jct), "jct_p50_ms": pct(jct, 50), "jct_p99_ms": pct(jct, 99),
            "ttft_p50_ms": pct(ttft, 50) if ttft else None,
            "throughput_rps": sum(s["throughput_rps"] for s in sums) / len(sums),
            "boundary_wait_ms_per_request": 1e3 * sum(b["wait_s"] for b in bnd) / len(reqs),
            "boundaries_per_request": sum(b["boundaries"] for b in bnd) / len(reqs),
        }
json.dump(res, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("| concurrency | k | mean JCT ms | p50 | p99 | TTFT p50 ms | req/s | mean JCT ÷ k=1 | req/s ÷ k=1 | boundary wait ms/request | boundaries/request |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for c in (1, 8):
    base = res[f"k1-c{c}"]
    for k in (1, 2, 3):
        x = res[f"k{k}-c{c}"]
        print(f"| {c} | {k} | {x['jct_mean_ms']:.1f} | {x['jct_p50_ms']:.1f} | {x['jct_p99_ms']:.1f} | "
              f"{x['ttft_p50_ms']:.1f} | {x['throughput_rps']:.2f} | {x['jct_mean_ms'] / base['jct_mean_ms']:.2f} | "
              f"{x['throughput_rps'] / base['throughput_rps']:.2f} | {x['boundary_wait_ms_per_request']:.2f} | "
              f"{x['boundaries_per_request']:.1f} |")
PY
