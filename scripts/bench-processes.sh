#!/usr/bin/env bash
# Job completion time of the embedded tiny-omni graph with every stage in its own worker process
# (`process = true` on every stage through OMNISTAGE_STAGE__<ID>__PROCESS=true: each replica is a
# supervised child `omnistage worker`, connected to the gateway over shared memory) against the
# same graph with every stage in the gateway's process. Regenerates the "Stages in separate
# processes" table in benches/README.md.
#
# The two servers run one at a time, never side by side, alternating A B A B ... (ROUNDS rounds),
# each started fresh from the same tiny checkpoints and stopped after its benches, since the
# machine is shared and noisy. Each round drives both with the same seeded workloads
# (`omnistage bench`): the mix (default text=1,image=1,speech=1: streamed chats, 64×64 8-step
# images, streamed chats with text + audio out) at Poisson RATE req/s and closed loop
# CONCURRENCY, COUNT requests each. Before benching the process deployment the script checks, from
# /health, that every stage lists worker pids and that each pid is a live child of the server.
#
# Usage: scripts/bench-processes.sh [OUT_DIR] (default benches/results/processes)
# Environment: ROUNDS (4), COUNT (100), RATE (4), CONCURRENCY (4), MIX (text=1,image=1,speech=1),
# SEED (42), SERVER_ENV (extra VAR=VALUE words for both servers and their workers, e.g.
# RAYON_NUM_THREADS=1), BUILD (0: use target/release/omnistage as it is), KEEP (a folder to keep the full results.json files with every request in; default
# none: they are written to a temporary folder and only their summaries are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benches/results/processes}
rounds=${ROUNDS:-4}
count=${COUNT:-100}
rate=${RATE:-4}
conc=${CONCURRENCY:-4}
mix=${MIX:-text=1,image=1,speech=1}
seed=${SEED:-42}
server_env=${SERVER_ENV:-}
[ "${BUILD:-1}" = 0 ] || cargo build --release --bin omnistage
bin=target/release/omnistage
work=$(mktemp -d)
cache="$work/cache"
mkdir -p "$cache" "$out"
raw=${KEEP:-$work/raw}
mkdir -p "$raw"
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() {
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0
    kill -0 "$server" 2>/dev/null || { echo "server exited before /health was ready" >&2; return 1; }
    sleep 0.2
  done
  echo "server on port $1 never became ready" >&2; return 1
}
# Stops the server and checks that no worker it started outlives it.
stop_server() {
  local workers=("$@")
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
  for pid in "${workers[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "worker pid $pid outlived its server; stopping it" >&2
      kill "$pid" 2>/dev/null || true
    fi
  done
}

# The stage ids, from the embedded deployment (`check` prints nothing we need; /health lists them).
env_for_processes=()
start_server() { # mode port
  local mode=$1 port=$2
  if [ "$mode" = processes ]; then
    env $server_env "${env_for_processes[@]}" OMNISTAGE_CACHE="$cache" "$bin" serve --port "$port" \
      >>"$work/$mode.log" 2>&1 &
  else
    env $server_env OMNISTAGE_CACHE="$cache" "$bin" serve --port "$port" >>"$work/$mode.log" 2>&1 &
  fi
  server=$!
  wait_ready "$port"
}

run_benches() { # mode port round
  local mode=$1 port=$2 r=$3
  for load in "rate=$rate" "concurrency=$conc"; do
    local key=${load%%=*} val=${load##*=} name
    name="$mode-${key}${val}-r$r"
    "$bin" bench --url "http://127.0.0.1:$port" --label "$mode" --mix "$mix" --count "$count" \
      --seed "$seed" "--$key" "$val" --quiet --out "$raw/$name" >"$raw/$name.txt"
    # Keep the summary (not every request's trace) in the repository.
    jq 'del(.requests)' "$raw/$name/results.json" >"$out/$name.json"
    echo "  $name: $(grep -m1 makespan "$raw/$name.txt")"
  done
}

echo "server env: ${server_env:-(none)}" >"$out/machine.txt"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"
nproc >>"$out/machine.txt"
for r in $(seq 1 "$rounds"); do
  for mode in single processes; do
    port=$(free_port)
    echo "round $r: $mode on port $port (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    start_server "$mode" "$port"
    health=$(curl -s "http://127.0.0.1:$port/health")
    workers=()
    if [ "$mode" = single ]; then
      if [ ${#env_for_processes[@]} -eq 0 ]; then
        while read -r id; do
          var=$(echo "$id" | tr '[:lower:]-' '[:upper:]_')
          env_for_processes+=("OMNISTAGE_STAGE__${var}__PROCESS=true")
        done < <(echo "$health" | jq -r '.stages | keys[]')
        printf '%s\n' "${env_for_processes[@]}" >"$out/process-env.txt"
      fi
      # One process: no stage reports workers.
      if [ "$(echo "$health" | jq '[.stages[] | select(has("workers"))] | length')" != 0 ]; then
        echo "single-process server reports worker processes" >&2; exit 1
      fi
    else
      echo "$health" | jq --argjson gw "$server" '{gateway_pid: $gw} + .' >"$out/health-processes-r$r.json"
      # Every stage must list at least one worker with a pid, each a live child of the server.
      missing=$(echo "$health" | jq -r '.stages | to_entries[] | select(([.value.workers[]?.pid] | length) == 0) | .key')
      if [ -n "$missing" ]; then echo "stages without worker processes: $missing" >&2; exit 1; fi
      while read -r id pid; do
        ppid=$(ps -o ppid= -p "$pid" | tr -d ' ' || true)
        if [ "$ppid" != "$server" ] || [ "$pid" = "$server" ]; then
          echo "stage $id: worker pid $pid is not a child process of the server ($server), ppid '$ppid'" >&2; exit 1
        fi
        workers+=("$pid")
      done < <(echo "$health" | jq -r '.stages | to_entries[] | .key as $k | .value.workers[] | "\($k) \(.pid)"')
      echo "  ${#workers[@]} worker processes, gateway pid $server: $(echo "$health" | jq -c '[.stages | to_entries[] | {(.key): [.value.workers[].pid]}] | add')"
    fi
    run_benches "$mode" "$port" "$r"
    stop_server "${workers[@]}"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"

# Pool every round's requests per mode, load and kind; per-stage breakdown as request-weighted
# means of each run's server-trace summary.
python3 - "$raw" "$out" "$rounds" "$rate" "$conc" <<'EOF'
import json, sys, os
raw, out, rounds, rate, conc = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
def pct(v, q):
    v = sorted(v)
    if not v: return None
    k = q / 100 * (len(v) - 1); lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)
loads = [f"rate{rate}", f"concurrency{conc}"]
res = {}
for load in loads:
    for mode in ("single", "processes"):
        runs = [json.load(open(os.path.join(raw, f"{mode}-{load}-r{r}", "results.json"))) for r in range(1, rounds + 1)]
        kinds = {}
        for kind in ["text", "image", "speech", "omni", "all"]:
            reqs = [q for run in runs for q in run["requests"] if q["outcome"] == "ok" and (kind == "all" or q["kind"] == kind)]
            if not reqs: continue
            jct = [q["jct_ms"] for q in reqs]
            sums = [s for run in runs for s in run["summary"] if s["kind"] == kind]
            stages, edges = {}, {}
            for s in sums:
                for st in s["stages"]:
                    a = stages.setdefault(st["stage"], [0, 0.0, 0.0])
                    n = st["requests"]; a[0] += n
                    a[1] += n * (st["queue_wait_ms"] or 0); a[2] += n * (st["compute_ms"] or 0)
                for e in s["edges"]:
                    a = edges.setdefault(e["edge"], [0, 0.0])
                    a[0] += e["requests"]; a[1] += e["requests"] * e["transfer_ms"]
            cms = [s["client_minus_server_ms"] for s in sums if s["client_minus_server_ms"] is not None]
            kinds[kind] = {
                "ok": len(reqs),
                "errors": sum(s["errors"] + s["refused"] for s in sums),
                "jct_mean_ms": sum(jct) / len(jct), "jct_p50_ms": pct(jct, 50), "jct_p99_ms": pct(jct, 99),
                "jct_mean_ms_per_round": [s["jct_ms"]["mean"] for s in sums],
                "throughput_rps_per_round": [s["throughput_rps"] for s in sums],
                "throughput_rps": sum(s["throughput_rps"] for s in sums) / len(sums),
                "ttft_p50_ms": pct([q["ttft_ms"] for q in reqs if q.get("ttft_ms") is not None], 50),
                "ttfp_p50_ms": pct([q["ttfp_ms"] for q in reqs if q.get("ttfp_ms") is not None], 50),
                "client_minus_server_ms": sum(cms) / len(cms) if cms else None,
                "stages": {k: {"requests": v[0], "queue_wait_ms": v[1] / v[0], "compute_ms": v[2] / v[0]} for k, v in stages.items() if v[0]},
                "edges": {k: {"requests": v[0], "transfer_ms": v[1] / v[0]} for k, v in edges.items() if v[0]},
            }
        res.setdefault(load, {})[mode] = kinds
json.dump(res, open(os.path.join(out, "summary.json"), "w"), indent=1)
f = lambda x: "-" if x is None else f"{x:.1f}"
lines = []
for load in loads:
    lines.append(f"\n{load} (pooled over {rounds} rounds), JCT in ms\n")
    lines.append("| kind | single mean | p50 | p99 | req/s | processes mean | p50 | p99 | req/s | mean ratio | p50 ratio | p99 ratio |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    s, p = res[load]["single"], res[load]["processes"]
    for k in s:
        if k not in p: continue
        a, b = s[k], p[k]
        lines.append(f"| {k} | {f(a['jct_mean_ms'])} | {f(a['jct_p50_ms'])} | {f(a['jct_p99_ms'])} | {a['throughput_rps']:.2f} | "
                     f"{f(b['jct_mean_ms'])} | {f(b['jct_p50_ms'])} | {f(b['jct_p99_ms'])} | {b['throughput_rps']:.2f} | "
                     f"{b['jct_mean_ms']/a['jct_mean_ms']:.2f} | {b['jct_p50_ms']/a['jct_p50_ms']:.2f} | {b['jct_p99_ms']/a['jct_p99_ms']:.2f} |")
    lines.append("\nper-round mean JCT (all kinds): single " + ", ".join(f(x) for x in s["all"]["jct_mean_ms_per_round"])
                 + "; processes " + ", ".join(f(x) for x in p["all"]["jct_mean_ms_per_round"]))
    lines.append("client − server ms (all): single " + f(s["all"]["client_minus_server_ms"]) + ", processes " + f(p["all"]["client_minus_server_ms"]))
    lines.append("\nper-stage breakdown, mean ms per request that visits the stage (queue / compute), all kinds:")
    lines.append("| stage | single queue | single compute | processes queue | processes compute |")
    lines.append("|---|---|---|---|---|")
    for st in s["all"]["stages"]:
        a, b = s["all"]["stages"][st], p["all"]["stages"].get(st, {})
        lines.append(f"| {st} | {f(a['queue_wait_ms'])} | {f(a['compute_ms'])} | {f(b.get('queue_wait_ms'))} | {f(b.get('compute_ms'))} |")
    for e in s["all"]["edges"]:
        a, b = s["all"]["edges"][e], p["all"]["edges"].get(e, {})
        lines.append(f"| edge {e} transfer | | {f(a['transfer_ms'])} | | {f(b.get('transfer_ms'))} |")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "compare.txt"), "w").write(text)
print(text)
EOF
