#!/usr/bin/env bash
# Benchmark the coordination queue and named locks, each against its baseline in the same run:
#   1. send-to-receive latency: messages sent through the library to a live instance whose
#      `app recv --follow --json` prints them; file-system events against the polling fallback
#      (`--poll`, APP_POLL_INTERVAL=2s). Targets with events: p50 under 5 ms, p99 under 50 ms
#      (a reference design that polls every 2 s quotes about 100 ms).
#   2. lock acquire+release per second: `app lock run NAME -- true` against `flock FILE true`
#      (both start a process per round), then in one process: the library's lock against
#      flock(2) on a file.
#
#   scripts/bench-queue.sh   BENCH_MESSAGES=N (default 300) messages with events,
#                            BENCH_POLL_MESSAGES=N (default 15) with polling,
#                            BENCH_LOCKS=N (default 200) lock rounds; TMPDIR picks the file system.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
messages=${BENCH_MESSAGES:-300}
poll_messages=${BENCH_POLL_MESSAGES:-15}
lock_rounds=${BENCH_LOCKS:-200}
for value in "$messages" "$poll_messages" "$lock_rounds"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-queue: BENCH_MESSAGES, BENCH_POLL_MESSAGES and BENCH_LOCKS must be positive integers, got '$value'" >&2; exit 2; }
done
command -v flock >/dev/null || { echo "bench-queue: skipped: flock(1) (the baseline) is missing"; exit 0; }

cd "$root"
cargo build --release --quiet --bin app --example queue_bench
target=$(realpath "${CARGO_TARGET_DIR:-target}/release")
app=$target/app
bench=$target/examples/queue_bench

tmp=$(mktemp -d)
run_pid=
cleanup() {
    if [[ -n $run_pid ]]; then
        kill -TERM "$run_pid" 2>/dev/null || true
        wait "$run_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
export APP_HOME=$tmp/home    # keep the bench's database out of the user's

repo=$tmp/repo
git init -q "$repo"
git -C "$repo" -c user.name=bench -c user.email=bench@invalid commit -q --allow-empty -m start
cd "$repo"
"$app" run --instance bench-rx -- sleep 3600 >/dev/null 2>&1 &
run_pid=$!
for _ in $(seq 100); do
    "$app" instance info bench-rx >/dev/null 2>&1 && break
    sleep 0.1
done
"$app" instance info bench-rx >/dev/null || { echo "bench-queue: FAILED: the receiving instance did not start" >&2; exit 1; }

# Prints "p50 p99" in milliseconds of the microsecond latencies in file $1.
percentiles() {
    sort -n "$1" | awk '{v[NR] = $1} END {
        p50 = v[int((NR - 1) * 0.50) + 1]; p99 = v[int((NR - 1) * 0.99) + 1]
        printf "%.2f %.2f\n", p50 / 1000, p99 / 1000}'
}

echo "== send-to-receive latency =="
"$bench" latency "$app" bench-rx "$messages" 20 >"$tmp/events.us"
read -r ev50 ev99 < <(percentiles "$tmp/events.us")
printf '  events:      %5d messages  p50 %8.2f ms  p99 %8.2f ms   (targets: p50 < 5, p99 < 50)\n' "$messages" "$ev50" "$ev99"
APP_POLL_INTERVAL=2s "$bench" latency "$app" bench-rx "$poll_messages" 2000 --poll >"$tmp/poll.us"
read -r po50 po99 < <(percentiles "$tmp/poll.us")
printf '  polling 2 s: %5d messages  p50 %8.2f ms  p99 %8.2f ms\n' "$poll_messages" "$po50" "$po99"
awk -v e="$ev50" -v p="$po50" 'BEGIN {printf "  events p50 is %.0fx faster than polling p50\n", p / e}'

echo "== lock acquire+release =="
start=$(date +%s%N)
for ((i = 0; i < lock_rounds; i++)); do "$app" lock run bench -- true; done
app_ns=$(($(date +%s%N) - start))
start=$(date +%s%N)
for ((i = 0; i < lock_rounds; i++)); do flock "$tmp/flock-file" true; done
flock_ns=$(($(date +%s%N) - start))
awk -v n="$lock_rounds" -v a="$app_ns" -v f="$flock_ns" 'BEGIN {
    printf "  command line: app lock run %7.0f/s   flock(1) %7.0f/s   ratio %.2fx\n", n / (a / 1e9), n / (f / 1e9), f / a}'
read -r lib_rate flock_rate < <("$bench" locks $((lock_rounds * 10)))
awk -v a="$lib_rate" -v f="$flock_rate" 'BEGIN {
    printf "  in process:   app::lock   %7.0f/s   flock(2) %7.0f/s   ratio %.3fx\n", a, f, a / f}'
