#!/usr/bin/env bash
# Benchmark `app mcp`: per-call latency over stdio of `list_instances` and `send_message` (the
# median and 90th percentile of BENCH_CALLS calls each, one at a time, raw JSON-RPC lines so no
# client library is measured), against the same operations through the CLI in the same run
# (`app instance list --json` and `app send`, a process per call, as an agent without MCP does).
# The server acts for instance bench-a (it runs in that worktree); the messages go to bench-b.
#
#   scripts/bench-mcp.sh   BENCH_CALLS=N (default 200); TMPDIR picks the file system.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
calls=${BENCH_CALLS:-200}
[[ $calls =~ ^[1-9][0-9]*$ ]] || { echo "bench-mcp: BENCH_CALLS must be a positive integer, got '$calls'" >&2; exit 2; }

cd "$root"
cargo build --release --quiet --bin app --example mcp_bench
target=$(realpath "${CARGO_TARGET_DIR:-target}/release")
app=$target/app
bench=$target/examples/mcp_bench

tmp=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
export APP_HOME=$tmp/home    # keep the bench's database out of the user's
unset APP_INSTANCE_ID

repo=$tmp/repo
git init -q "$repo"
git -C "$repo" -c user.name=bench -c user.email=bench@invalid commit -q --allow-empty -m start
cd "$repo"
for id in bench-a bench-b; do
    "$app" run --instance "$id" -- sleep 3600 >/dev/null 2>&1 &
    pids+=($!)
done
for id in bench-a bench-b; do
    for _ in $(seq 100); do
        "$app" instance info "$id" >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$app" instance info "$id" >/dev/null || { echo "bench-mcp: FAILED: instance $id did not start" >&2; exit 1; }
done

echo "mcp benchmark: $calls calls each, $(nproc) CPUs, state on $(stat -f -c %T "$tmp") ($tmp)"
(cd "$repo/.app/worktrees/bench-a" && "$bench" "$app" "$calls" bench-b) >"$tmp/results"
value() { awk -v name="$1" -v col="$2" '$1 == name {print $col / 1000}' "$tmp/results"; }
row() {
    local label=$1 mcp=$2 cli=$3
    awk -v l="$label" -v m50="$(value "$mcp" 2)" -v m90="$(value "$mcp" 3)" \
        -v c50="$(value "$cli" 2)" -v c90="$(value "$cli" 3)" 'BEGIN {
        printf "  %-15s mcp median %7.3f ms (p90 %7.3f)   cli median %7.3f ms (p90 %7.3f)   cli/mcp %5.1fx\n",
            l, m50, m90, c50, c90, c50 / m50}'
}
row list_instances mcp_list_instances cli_instance_list
row send_message mcp_send_message cli_send
