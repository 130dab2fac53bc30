#!/usr/bin/env bash
# Benchmark the web dashboard of `app serve --with-api`, each figure against a baseline measured
# in the same run, with BENCH_INSTANCES (default 100) live instances (`app run --no-worktree --
# sleep`, no worktrees) and one finished `app orchestrate` run of BENCH_TASKS (default 50) tasks
# of `true` in waves of 10, in a small repository (one empty commit):
#   1. page load in headless Chromium (examples/dash_bench.rs, the test suite's WebDriver
#      client): navigation start to the first complete render of the overview, all instance rows
#      and the run's task graph, over BENCH_LOADS (default 10) loads, p50 and max (target: under
#      200 ms); against a static document of the same server (GET /health), navigation start to
#      its load event;
#   2. event-to-screen latency over BENCH_EVENTS (default 50) messages: `app send` started to
#      the page's timeline showing its message.sent event, p50/p99 (target: p50 under 100 ms);
#      against the `app send` command's own run time;
#   3. `app serve --with-api` idle CPU and RSS over BENCH_IDLE (default 20) seconds each with no
#      client, with one dashboard page open, and with 50 `curl -sN /events` clients (targets:
#      under 1% CPU, under 30 MB), each against "none";
#   4. the per-instance per-tick cost of state detection: scripts/bench-state.sh.
# Needs chromium and chromedriver (scripts/install-browser.sh) for 1 and 2 and one dashboard in
# 3, curl for the SSE clients; says SKIPPED for what it cannot measure. TMPDIR picks the file
# system. Targets are printed, not enforced.
#
#   scripts/bench-dash.sh   BENCH_INSTANCES=N (100), BENCH_TASKS=N (50), BENCH_LOADS=N (10),
#                           BENCH_EVENTS=N (50), BENCH_IDLE=S (20)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
instances=${BENCH_INSTANCES:-100}
tasks=${BENCH_TASKS:-50}
loads=${BENCH_LOADS:-10}
events=${BENCH_EVENTS:-50}
idle=${BENCH_IDLE:-20}
for value in "$instances" "$tasks" "$loads" "$events" "$idle"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-dash: BENCH_INSTANCES, BENCH_TASKS, BENCH_LOADS, BENCH_EVENTS and BENCH_IDLE must be positive integers, got '$value'" >&2; exit 2; }
done
((instances >= 2)) || { echo "bench-dash: BENCH_INSTANCES must be at least 2 (messages go from one to another), got $instances" >&2; exit 2; }

browser=yes
command -v chromium >/dev/null && command -v chromedriver >/dev/null || browser=

cd "$root"
cargo build --release --quiet --bin app
[[ -z $browser ]] || cargo build --release --quiet --example dash_bench
target=$(realpath "${CARGO_TARGET_DIR:-target}")
app=$target/release/app
bench=$target/release/examples/dash_bench

tmp=$(mktemp -d)
pids=()
cleanup() {
    # Every process is stopped even when one of them already exited (set -e would end this
    # function at the first failing wait). A dash_bench runs in its own process group, with its
    # chromedriver and Chromium.
    local pid
    for pid in "${pids[@]}"; do
        if [[ $pid == -* ]]; then kill -TERM -- "$pid" 2>/dev/null || true; else kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for pid in "${pids[@]}"; do wait "${pid#-}" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
mkdir "$tmp/home"
user_home=$HOME
export HOME=$tmp/home XDG_CONFIG_HOME=$tmp/home/.config GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
export APP_HOME=$tmp/home/app
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@invalid GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@invalid
git init -q "$tmp/repo"
git -C "$tmp/repo" commit -q --allow-empty -m start
cd "$tmp/repo"

# The run first (it is finished before the page loads), waves of 10: task i waits for task i-10.
{
    printf '{"name": "bench", "max_concurrent": 10, "tasks": ['
    for ((i = 1; i <= tasks; i++)); do
        ((i == 1)) || printf ', '
        printf '{"id": "t%d", "command": "true"' "$i"
        ((i <= 10)) || printf ', "depends_on": ["t%d"]' $((i - 10))
        printf '}'
    done
    printf ']}\n'
} >"$tmp/plan.json"
"$app" orchestrate --plan "$tmp/plan.json" --progress none >/dev/null

lifetime=$((idle * 3 + 1200))
for ((i = 1; i <= instances; i++)); do
    "$app" run --no-worktree --instance "b$i" -- sleep "$lifetime" >/dev/null 2>&1 &
    pids+=($!)
done
running=0
for _ in $(seq 600); do
    running=$("$app" instance list --json | grep -o '"status": *"running"' | wc -l)
    ((running >= instances)) && break
    sleep 0.2
done
((running >= instances)) || { echo "bench-dash: only $running of $instances instances came up" >&2; exit 1; }

"$app" serve --with-api --api-addr 127.0.0.1:0 --instance api >/dev/null 2>&1 &
serve_pid=$!
pids+=("$serve_pid")
url=
for _ in $(seq 100); do
    url=$("$app" instance info api 2>/dev/null | awk '/^api:/ {print $2}')
    [[ $url == http* ]] && break
    sleep 0.1
done
[[ $url == http* ]] || { echo "bench-dash: app serve --with-api did not come up" >&2; exit 1; }
echo "== $instances live instances (app run --no-worktree -- sleep), a finished run of $tasks tasks; load: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores =="

if [[ -n $browser ]]; then
    echo "== page load, $loads loads after one untimed =="
    "$bench" load "$url" "$loads" "$instances" "$tasks" >"$tmp/load"
    awk '{ v[$1] = $2; m[$1] = $3 } END {
        printf "  first complete render   p50 %7.1f ms  max %7.1f ms  (target < 200 ms)\n", v["page"], m["page"]
        printf "    of which GET /overview p50 %7.1f ms  max %7.1f ms\n", v["overview"], m["overview"]
        printf "  static page (/health)   p50 %7.1f ms  max %7.1f ms\n", v["static"], m["static"]
        printf "  ratio (p50) %.1fx\n", v["page"] / v["static"] }' "$tmp/load"

    echo "== event to screen, $events messages (app send -> message.sent in the timeline) =="
    "$bench" latency "$url" "$events" "$app" b1 b2 >"$tmp/latency"
    awk '{ p50[$1] = $2; p99[$1] = $3; mx[$1] = $4 } END {
        printf "  to the page      p50 %7.1f ms  p99 %7.1f ms  max %7.1f ms  (target p50 < 100 ms)\n", p50["screen"], p99["screen"], mx["screen"]
        printf "  app send itself  p50 %7.1f ms  p99 %7.1f ms  max %7.1f ms\n", p50["send"], p99["send"], mx["send"]
        printf "  ratio (p50) %.1fx\n", p50["screen"] / p50["send"] }' "$tmp/latency"
else
    echo "SKIPPED page load and event-to-screen latency: chromium or chromedriver is not on PATH (scripts/install-browser.sh)"
fi

echo "== app serve --with-api idle over ${idle}s each =="
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$serve_pid/stat"; }
# Measures the server idle for $idle seconds; prints "CPU_PERCENT RSS_MB".
measure() {
    local before after
    before=$(cpu_ticks)
    sleep "$idle"
    after=$(cpu_ticks)
    awk -v t=$((after - before)) -v hz="$hz" -v s="$idle" -v r="$(awk '/VmRSS/ {print $2}' "/proc/$serve_pid/status")" \
        'BEGIN { printf "%.3f %.1f\n", 100 * t / hz / s, r / 1024 }'
}
line() { # name, "CPU RSS", "CPU RSS" of none
    awk -v n="$1" -v c="${2% *}" -v r="${2#* }" -v c0="${3% *}" -v r0="${3#* }" 'BEGIN {
        printf "  %-22s CPU %6.3f%% (target < 1%%)  RSS %5.1f MB (target < 30 MB)", n, c, r
        if (n != "no client") printf "  vs none: CPU %s, RSS %.2fx", (c0 > 0 ? sprintf("%.1fx", c / c0) : "+" sprintf("%.3f", c - c0) " points"), r / r0
        printf "\n" }'
}
none=$(measure)
line "no client" "$none" "$none"

if [[ -n $browser ]]; then
    setsid "$bench" hold "$url" $((idle + 5)) >"$tmp/hold" &
    hold_pid=$!
    pids+=("-$hold_pid")
    for _ in $(seq 600); do
        grep -q open "$tmp/hold" && break
        sleep 0.1
    done
    grep -q open "$tmp/hold" || { echo "bench-dash: the dashboard page did not open" >&2; exit 1; }
    line "one dashboard page" "$(measure)" "$none"
    wait "$hold_pid"
else
    echo "  SKIPPED one dashboard page: no chromium or chromedriver"
fi

if command -v curl >/dev/null; then
    curls=()
    for _ in $(seq 50); do
        curl -sfN "$url/events" >/dev/null &
        curls+=($!)
        pids+=($!)
    done
    sleep 2
    line "50 SSE clients (curl)" "$(measure)" "$none"
    for pid in "${curls[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
else
    echo "  SKIPPED 50 SSE clients: no curl"
fi

echo "== state detection per instance per tick =="
if [[ -x $root/scripts/bench-state.sh ]]; then
    # With the user's home back: it builds with cargo.
    (cd "$root" && HOME=$user_home "$root/scripts/bench-state.sh")
else
    echo "  measured by scripts/bench-state.sh (not in this tree yet)"
fi
