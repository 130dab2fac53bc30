#!/usr/bin/env bash
# Benchmark the instance control plane, each figure against its baseline in the same run:
#   1. `app instance exec ID -- true` round trip against spawning `true` directly;
#   2. idle CPU and peak RSS of an `app run -- sleep` supervisor and of `app serve --with-api`
#      (with one event-stream subscriber when curl is there), over the same BENCH_IDLE seconds
#      (targets: under 0.5% CPU and under 15 MB; a reference design quotes about 50 MB per
#      instance and under 1% idle CPU).
#
#   scripts/bench-control.sh    BENCH_EXECS=N (default 200), BENCH_IDLE=S (default 30)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
execs=${BENCH_EXECS:-200}
idle=${BENCH_IDLE:-30}
for value in "$execs" "$idle"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-control: BENCH_EXECS and BENCH_IDLE must be positive integers, got '$value'" >&2; exit 2; }
done

cd "$root"
cargo build --release --quiet --bin app
app=$(realpath "${CARGO_TARGET_DIR:-target}/release/app")

tmp=$(mktemp -d)
run_pid=
serve_pid=
curl_pid=
cleanup() {
    # Every process is stopped even when one of them already exited (set -e would end this
    # function at the first failing wait).
    for pid in $curl_pid $serve_pid $run_pid; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
export APP_HOME=$tmp/home
git init -q "$tmp/repo"
git -C "$tmp/repo" -c user.name=bench -c user.email=bench@invalid commit -q --allow-empty -m start
cd "$tmp/repo"
"$app" run --instance bench -- sleep $((idle + 600)) >/dev/null 2>&1 &
run_pid=$!
for _ in $(seq 100); do
    "$app" instance exec bench -- true 2>/dev/null && break
    sleep 0.1
done

now_us() { local t=${EPOCHREALTIME/[.,]/}; REPLY=$((10#$t)); }

echo "== exec round trip, $execs each =="
now_us; start=$REPLY
for ((i = 0; i < execs; i++)); do "$app" instance exec bench -- true; done
now_us; exec_us=$(((REPLY - start) / execs))
now_us; start=$REPLY
for ((i = 0; i < execs; i++)); do /bin/true; done
now_us; direct_us=$(((REPLY - start) / execs))
awk -v e="$exec_us" -v d="$direct_us" 'BEGIN {
    printf "  app instance exec -- true  %7.2f ms\n  true, spawned directly      %7.2f ms\n  ratio %.1fx\n", e / 1000, d / 1000, e / d }'

"$app" serve --with-api --api-addr 127.0.0.1:0 --instance api >/dev/null 2>&1 &
serve_pid=$!
url=
for _ in $(seq 100); do
    url=$("$app" instance info api 2>/dev/null | awk '/^api:/ {print $2}')
    [[ $url == http* ]] && break
    sleep 0.1
done
[[ $url == http* ]] || { echo "bench-control: app serve --with-api did not come up" >&2; exit 1; }
if command -v curl >/dev/null; then
    curl -sfN "$url/events" >/dev/null &
    curl_pid=$!
    subscribers="1 subscriber"
else
    subscribers="no subscriber (no curl)"
fi

echo "== idle over ${idle}s: app run -- sleep, and app serve --with-api ($subscribers) =="
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run_before=$(cpu_ticks "$run_pid")
serve_before=$(cpu_ticks "$serve_pid")
sleep "$idle"
run_after=$(cpu_ticks "$run_pid")
serve_after=$(cpu_ticks "$serve_pid")
report() { # name, ticks, pid
    local peak_kb rss_kb
    peak_kb=$(awk '/VmHWM/ {print $2}' "/proc/$3/status")
    rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$3/status")
    awk -v n="$1" -v t="$2" -v hz="$ticks" -v s="$idle" -v p="$peak_kb" -v r="$rss_kb" 'BEGIN {
        printf "  %-24s CPU %.3f%% (target < 0.5%%)   RSS %.1f MB, peak %.1f MB (target < 15 MB)\n", n, 100 * t / hz / s, r / 1024, p / 1024 }'
}
report "app run -- sleep" $((run_after - run_before)) "$run_pid"
report "app serve --with-api" $((serve_after - serve_before)) "$serve_pid"
