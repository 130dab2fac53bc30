#!/usr/bin/env bash
# Benchmark the fleet (docs/FLEET.md), each figure against a baseline measured in the same run.
# One sqld on 127.0.0.1, one bare remote, and "hosts": clones in separate directories, each with
# its own HOME, APP_HOME and APP_FLEET_HOST, all with the same APP_DB_URL and APP_SHARED_SECRET.
# Host 0 orchestrates; hosts 1 and 2 run `app worker`.
#   (a) BENCH_TASKS_A (default 32) tasks of `sleep 1` + a commit on 1 worker of capacity 4
#       against 2 workers of capacity 4: the wall time ratio two / one (target: at most 0.55x).
#       Measured twice: with every process on every core ("shared cores": the CPU contention of
#       one box, where 2 workers run 8 attempts on the cores 1 worker runs 4 on), and, where the
#       machine has 2 cores or more and util-linux's taskset, with each worker (and the attempts
#       it starts, which inherit its affinity) pinned to a core of its own, worker 1 on core 0
#       and worker 2 on core 1 on both sides ("one core per host": hosts that bring their own
#       CPU); the orchestrator and sqld stay unpinned in both. Where taskset or a second core
#       is missing, the second is skipped, and the script says why.
#   (b) BENCH_TASKS_B (default 32) tasks of `true` + a commit, 4 at once: on the fleet (2
#       workers of capacity 2) against the same plan run locally on host 0 (`app orchestrate`
#       without --fleet, same APP_DB_URL, same max_concurrent): the coordination overhead per
#       task, (fleet - local) / tasks (target: under 100 ms on the loopback).
#   (c) Database requests, counted by sqld itself: the HTTP requests its admin endpoint's
#       /metrics reports (libsql_server_user_http_response, every status; /health is not asked
#       during a measurement), per task of (a) and (b), per second of an orchestrator watching
#       a run nobody takes, and per idle host-minute (BENCH_IDLE seconds, default 60, of 2 idle
#       workers; target: under 1 request per second per host). Then what a fleet of 20 hosts
#       with 10 agents each would ask of the server, against the ~95 write transactions per
#       second sqld with one connection serves (issue 16).
#   (d) Cross-host message latency: BENCH_MESSAGES (default 50) messages, one at a time, from
#       an instance on host 1 (`app send --to rx`) to instance rx on host 2 (`app recv
#       --follow`): from the start of each `app send` to the receiver printing it; p50 and
#       p99 (target: p50 under 250 ms).
# Every workers' start is outside the timing; every side of (a) and (b) starts fresh workers
# (a worker that just started looks for tasks every 250 ms, an idle one every 2 s, which would
# otherwise add up to 2 s at random to a side). BENCH_ROUNDS (default 2) rounds of (a) and (b)
# alternate which side goes first; the ratios are of the summed times.
# Needs nothing from ../shared. TMPDIR picks the file system (TMPDIR=/dev/shm: the tool's own
# cost). sqld comes from APP_TEST_SQLD or scripts/start-sqld.sh --install-only.
#
#   scripts/bench-fleet.sh   BENCH_TASKS_A=N, BENCH_TASKS_B=N, BENCH_ROUNDS=N, BENCH_IDLE=SECONDS,
#                            BENCH_MESSAGES=N; BENCH_ONLY=abcd (the parts to run; c needs a and b);
#                            BENCH_APP=PATH runs that app binary instead of building a release one;
#                            BENCH_LOGS=DIR keeps every run's orchestrator and worker logs there
#                            (with APP_LOG=app::worker=debug,app::orchestrate=debug: the phase
#                            timings of every task, docs/FLEET.md)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
only=${BENCH_ONLY:-abcd}
messages=${BENCH_MESSAGES:-50}
tasks_a=${BENCH_TASKS_A:-32}
tasks_b=${BENCH_TASKS_B:-32}
rounds=${BENCH_ROUNDS:-2}
idle_s=${BENCH_IDLE:-60}
for value in "$tasks_a" "$tasks_b" "$rounds" "$idle_s" "$messages"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-fleet: BENCH_TASKS_A, BENCH_TASKS_B, BENCH_ROUNDS, BENCH_IDLE and BENCH_MESSAGES must be positive integers, got '$value'" >&2; exit 2; }
done
[[ $only =~ ^[abcd]+$ ]] || { echo "bench-fleet: BENCH_ONLY takes letters of abcd (the parts to run), got '$only'" >&2; exit 2; }
[[ $only != *c* || ( $only == *a* && $only == *b* ) ]] || { echo "bench-fleet: part (c) divides by the runs of (a) and (b): BENCH_ONLY with c needs a and b too" >&2; exit 2; }
# Whether part $1 runs.
want() { [[ $only == *$1* ]]; }
command -v curl >/dev/null || { echo "bench-fleet: skipped: curl (to read sqld's metrics) is missing"; exit 0; }

cd "$root"
if [[ -n ${BENCH_APP:-} ]]; then
    app=$(realpath "$BENCH_APP")
else
    cargo build --release --quiet --bin app
    app=$(realpath "${CARGO_TARGET_DIR:-target}/release/app")
fi
sqld=${APP_TEST_SQLD:-}
if [[ -z $sqld ]] && ! sqld=$("$root/scripts/start-sqld.sh" --install-only); then
    echo "bench-fleet: skipped: no libSQL server binary (scripts/start-sqld.sh --install-only failed)"
    exit 0
fi

tmp=$(mktemp -d)
sqld_pid= workers=() others=() logs=${BENCH_LOGS:-} kept=0
if [[ -n $logs ]]; then
    mkdir -p "$logs"
    logs=$(realpath "$logs")
fi
cleanup() {
    local pid
    for pid in "${workers[@]}" "${others[@]}" $sqld_pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${workers[@]}" "${others[@]}" $sqld_pid; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@invalid GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@invalid
export APP_SHARED_SECRET=bench-fleet-secret

# Microsecond wall clock, without forking (bash 5's EPOCHREALTIME; the decimal mark may be ',').
now_us() { local t=${EPOCHREALTIME/[.,]/}; REPLY=$((10#$t)); }

# One server, its admin API (for /metrics) on a second port. A port may be taken: try a few.
for _ in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 20000)) admin=$((40000 + RANDOM % 20000))
    "$sqld" --db-path "$tmp/sqld/db" --http-listen-addr "127.0.0.1:$port" \
        --admin-listen-addr "127.0.0.1:$admin" --no-welcome \
        --max-concurrent-connections 1 >"$tmp/sqld.log" 2>&1 &
    sqld_pid=$!
    for _ in $(seq 100); do
        curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break 2
        kill -0 "$sqld_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$sqld_pid" 2>/dev/null || true
    wait "$sqld_pid" 2>/dev/null || true
    sqld_pid=
    rm -rf "$tmp/sqld"
done
[[ -n $sqld_pid ]] || { echo "bench-fleet: FAILED: sqld did not start; its log:" >&2; cat "$tmp/sqld.log" >&2; exit 1; }
export APP_DB_URL=http://127.0.0.1:$port

# REPLY = the HTTP requests sqld has answered so far (every path and status).
requests() {
    REPLY=$(curl -fsS "http://127.0.0.1:$admin/metrics" |
        awk '/^libsql_server_user_http_response[{ ]/ {n += $NF} END {printf "%d", n}')
}

# The hosts: a first repository pushed to a bare remote, and clones of it.
hosts=3
git init -q -b main "$tmp/seed"
git -C "$tmp/seed" commit -q --allow-empty -m start
git init -q --bare -b main "$tmp/remote.git"
git -C "$tmp/seed" push -q "$tmp/remote.git" main
for ((n = 0; n < hosts; n++)); do
    mkdir -p "$tmp/host$n/home"
    git clone -q "$tmp/remote.git" "$tmp/host$n/repo"
done

# Makes this (sub)shell host $1: its repository, its home, its fleet name.
enter() {
    cd "$tmp/host$1/repo"
    export HOME=$tmp/host$1/home XDG_CONFIG_HOME=$tmp/host$1/home/.config APP_HOME=$tmp/host$1/home/app
    export APP_FLEET_HOST=host$1
}

# Runs "${@:2}" as host $1.
on() { (enter "$1" && exec "${@:2}"); }

# Starts a worker of capacity $2 on each of hosts 1..$1 (`( ...; exec ) &`: $! is the worker
# itself, so a signal reaches it); returns once each has said it registered. With $3 = pin,
# worker n runs (with everything it starts) on core n - 1 only.
start_workers() {
    local count=$1 capacity=$2 pin=${3:-} n log
    local -a wrap
    for ((n = 1; n <= count; n++)); do
        log=$tmp/worker$n.log
        : >"$log"
        wrap=()
        [[ $pin == pin ]] && wrap=(taskset -c "$((n - 1))")
        (enter "$n" && exec "${wrap[@]}" "$app" worker --name "host$n" --capacity "$capacity") 2>"$log" &
        workers+=($!)
    done
    for ((n = 1; n <= count; n++)); do
        for _ in $(seq 200); do
            grep -q 'taking tasks' "$tmp/worker$n.log" && break
            sleep 0.05
        done
        if grep -q 'taking tasks' "$tmp/worker$n.log"; then
            # A pin that did not take would measure shared cores under the other name.
            [[ $pin != pin || $(taskset -pc "${workers[n - 1]}") == *": $((n - 1))" ]] && continue
            echo "bench-fleet: FAILED: worker host$n is not pinned to core $((n - 1)): $(taskset -pc "${workers[n - 1]}")" >&2
            exit 1
        fi
        echo "bench-fleet: FAILED: worker host$n did not register; its log:" >&2
        cat "$tmp/worker$n.log" >&2
        exit 1
    done
}

# Drains and ends every worker.
stop_workers() {
    local pid
    for pid in "${workers[@]}"; do kill -TERM "$pid"; done
    for pid in "${workers[@]}"; do wait "$pid" || { echo "bench-fleet: FAILED: a worker exited with $?" >&2; exit 1; }; done
    workers=()
}

# Writes a plan of $2 tasks, $3 at once, each running `$4` and committing a file of its own.
plan() {
    local i
    {
        printf '{"name": "bench", "max_concurrent": %d, "tasks": [' "$3"
        for ((i = 1; i <= $2; i++)); do
            ((i == 1)) || printf ', '
            printf '{"id": "t%d", "command": "%s && echo $APP_TASK_ID > $APP_TASK_ID.txt && git add $APP_TASK_ID.txt && git commit -qm $APP_TASK_ID"}' "$i" "$4"
        done
        printf ']}\n'
    } >"$1"
}

# Runs plan $1 on host 0 with the extra arguments "${@:2}"; REPLY = wall time in microseconds,
# REQUESTS = the server's requests meanwhile. Stops the script unless every task succeeded.
time_plan() {
    local t0 r0
    requests; r0=$REPLY
    now_us; t0=$REPLY
    on 0 "$app" orchestrate --plan "$1" "${@:2}" --progress none >"$tmp/summary" 2>"$tmp/orchestrate.log" || {
        echo "bench-fleet: FAILED: the run failed:" >&2
        cat "$tmp/orchestrate.log" "$tmp/summary" >&2
        exit 1
    }
    now_us; t0=$((REPLY - t0))
    requests; REQUESTS=$((REPLY - r0))
    REPLY=$t0
    keep_logs "$(basename "$1" .json)$([[ $* == *--fleet* ]] && echo -fleet || echo -local)"
}

# Copies the logs of the run that just ended to BENCH_LOGS (if set), named after $1 (workers'
# logs as they stand: a worker's later runs append to it).
keep_logs() {
    [[ -n $logs ]] || return 0
    local n
    kept=$((kept + 1))
    cp "$tmp/orchestrate.log" "$logs/$kept-$1-orchestrate.log"
    for n in 1 2; do
        [[ -f $tmp/worker$n.log ]] && cp "$tmp/worker$n.log" "$logs/$kept-$1-worker$n.log"
    done
    return 0
}

echo "fleet benchmark: sqld $APP_DB_URL (one connection), repositories on $(stat -f -c %T "$tmp") ($tmp), $(nproc) CPUs"

if want a; then
    echo "== (a) $tasks_a tasks of 'sleep 1' + a commit: 1 worker against 2, capacity 4 each =="
    plan "$tmp/a.json" "$tasks_a" 8 "sleep 1"
    # The per-host variant needs a core for each worker and a way to pin them.
    variants=shared pin_skip=
    if ! command -v taskset >/dev/null; then
        pin_skip="taskset (util-linux) is missing"
    elif (($(nproc) < 2)); then
        pin_skip="only $(nproc) CPU is available to this script (nproc), the variant needs 2"
    else
        variants="shared pin"
    fi
    two_requests=0
    for variant in $variants; do
        one_total=0 two_total=0 ratios=()
        for ((round = 1; round <= rounds; round++)); do
            for side in $( ((round % 2)) && echo "1 2" || echo "2 1"); do
                start_workers "$side" 4 "$variant"
                time_plan "$tmp/a.json" --fleet
                stop_workers
                if ((side == 1)); then
                    one_us=$REPLY
                else
                    two_us=$REPLY
                    # Part (c)'s requests per task: of the shared-cores runs only.
                    [[ $variant == shared ]] && two_requests=$((two_requests + REQUESTS))
                fi
            done
            one_total=$((one_total + one_us)) two_total=$((two_total + two_us))
            ratios+=("$(awk -v a="$two_us" -v b="$one_us" 'BEGIN {printf "%.2fx", a / b}')")
        done
        if [[ $variant == shared ]]; then
            label="shared cores" what="every process on the same $(nproc) cores: one box's CPU contention"
        else
            label="one core per host" what="worker n and its attempts on core n - 1 (taskset): hosts with a CPU each"
        fi
        awk -v one="$one_total" -v two="$two_total" -v n="$rounds" -v each="${ratios[*]}" -v label="$label" -v what="$what" 'BEGIN {
            printf "  %s (%s):\n", label, what
            printf "    %-32s %8.1f ms per round (%d rounds)\n", "1 worker, capacity 4", one / n / 1000, n
            printf "    %-32s %8.1f ms per round\n", "2 workers, capacity 4", two / n / 1000
            printf "    2 workers / 1, %s: %.2fx (summed over the rounds; each round: %s; target: at most 0.55x)\n", label, two / one, each }'
    done
    [[ -z $pin_skip ]] || echo "  one core per host: skipped: $pin_skip"
fi

if want b; then
    echo "== (b) $tasks_b tasks of 'true' + a commit, 4 at once: fleet (2 workers of capacity 2) against local =="
    plan "$tmp/b.json" "$tasks_b" 4 "true"
    fleet_total=0 local_total=0 fleet_requests=0 local_requests=0
    for ((round = 1; round <= rounds; round++)); do
        for side in $( ((round % 2)) && echo "fleet local" || echo "local fleet"); do
            if [[ $side == fleet ]]; then
                start_workers 2 2
                time_plan "$tmp/b.json" --fleet
                stop_workers
                fleet_total=$((fleet_total + REPLY)) fleet_requests=$((fleet_requests + REQUESTS))
            else
                time_plan "$tmp/b.json"
                local_total=$((local_total + REPLY)) local_requests=$((local_requests + REQUESTS))
            fi
        done
    done
    awk -v f="$fleet_total" -v l="$local_total" -v n="$rounds" -v t="$tasks_b" 'BEGIN {
        printf "  %-34s %8.1f ms per round (%d rounds)\n", "fleet", f / n / 1000, n
        printf "  %-34s %8.1f ms per round\n", "local", l / n / 1000
        printf "  overhead per task %.1f ms ((fleet - local) / tasks; ratio %.2fx; target: under 100 ms)\n", (f - l) / n / t / 1000, f / l }'
fi

if want c; then
    echo "== (c) database requests (sqld's own count of HTTP requests) =="
    # An orchestrator watching a run no host can take (a label nobody offers), no worker running.
    printf '{"name": "waits", "tasks": [{"id": "w", "command": "true", "on": {"nobody": "1"}}]}\n' >"$tmp/c.json"
    watch_s=10
    requests; r0=$REPLY
    (enter 0 && exec "$app" orchestrate --plan "$tmp/c.json" --fleet --progress none) >/dev/null 2>"$tmp/watch.log" &
    watcher=$!
    sleep "$watch_s"
    requests; watching=$((REPLY - r0))
    kill -TERM "$watcher"
    wait "$watcher" || true
    # Two idle workers, once they are past their first busy seconds.
    start_workers 2 1
    sleep 6
    requests; r0=$REPLY
    sleep "$idle_s"
    requests; idle=$((REPLY - r0))
    stop_workers
    awk -v a="$two_requests" -v ta="$((tasks_a * rounds))" -v f="$fleet_requests" -v l="$local_requests" \
        -v tb="$((tasks_b * rounds))" -v w="$watching" -v ws="$watch_s" -v i="$idle" -v is="$idle_s" 'BEGIN {
        per_host = i / 2 / is; per_task = f / tb; watch = w / ws
        printf "  per task, (a) on 2 workers (sleep 1)   %6.1f requests\n", a / ta
        printf "  per task, (b) on the fleet (true)      %6.1f requests   (local run of (b): %.1f; the fleet adds %.1f)\n", per_task, l / tb, per_task - l / tb
        printf "  an orchestrator watching a run         %6.2f requests/s\n", watch
        printf "  an idle host                           %6.2f requests/s = %.0f per idle host-minute (target: under 1/s)\n", per_host, per_host * 60
        printf "  20 hosts x 10 agents, 1 run watched, each agent ending a task every D seconds\n"
        printf "  (per-task figure of (b), which also carries that run'"'"'s watching and heartbeats):\n"
        split("60 600 1800", ds, " ")
        for (k = 1; k <= 3; k++) {
            d = ds[k]
            printf "    D = %4d s: %6.1f requests/s (20 x %.2f idle + %.2f watching + 200 / %d x %.1f per task)\n", d, 20 * per_host + watch + 200 / d * per_task, per_host, watch, d, per_task
        }
        spare = 95 - 20 * per_host - watch
        if (spare > 0)
            printf "  against ~95 write transactions/s: the server keeps up while the tasks last over %.1f s on average\n", 200 * per_task / spare
        else
            printf "  against ~95 write transactions/s: the idle fleet alone needs more\n"
        printf "  (every request counted, reads too: an upper bound of the write transactions)\n" }'
fi

if want d; then
    echo "== (d) cross-host message latency: $messages messages, a sender on host 1 to a receiver on host 2 =="
    # The receiver: instance rx on host 2 running `app recv --follow --json`, each line it prints
    # stamped with the microsecond it was read. The sender: instance tx (`app serve`) on host 1;
    # each message carries the microsecond before its `app send` started, and the next is sent
    # once this one was received (so the receiver polls the server at its busy rate, 250 ms).
    recv_log=$tmp/recv.log
    : >"$recv_log"
    (enter 2 && exec "$app" run --no-worktree --instance rx -- bash -c \
        '"$0" recv --follow --json | while IFS= read -r line; do t=${EPOCHREALTIME/[.,]/}; printf "%s %s\n" "$((10#$t))" "$line"; done' \
        "$app") >"$recv_log" 2>"$tmp/recv.err" &
    others+=($!)
    receiver=$!
    (enter 1 && exec "$app" serve --instance tx) 2>"$tmp/send.err" &
    others+=($!)
    sender=$!
    for _ in $(seq 400); do
        on 1 "$app" instance list --everywhere 2>/dev/null | grep >/dev/null '^rx:.* host2 ' &&
            on 1 "$app" instance list 2>/dev/null | grep >/dev/null '^tx:' && break
        sleep 0.05
    done
    on 1 "$app" instance list --everywhere | grep >/dev/null '^rx:.* host2 ' || {
        echo "bench-fleet: FAILED: host 1 does not see the receiver on host 2:" >&2
        cat "$tmp/recv.err" "$tmp/send.err" >&2
        exit 1
    }
    : >"$tmp/latencies"
    : >"$tmp/sends"
    for ((i = 1; i <= messages; i++)); do
        now_us; sent=$REPLY
        on 1 "$app" send --from tx --to rx "bench-$i-$sent" >/dev/null
        now_us; echo $((REPLY - sent)) >>"$tmp/sends"
        got=
        for _ in $(seq 3000); do
            got=$(grep -m1 "\"bench-$i-$sent\"" "$recv_log" | cut -d' ' -f1) && [[ -n $got ]] && break
            sleep 0.005
        done
        [[ -n $got ]] || { echo "bench-fleet: FAILED: message $i did not arrive within 15 s" >&2; cat "$tmp/recv.err" >&2; exit 1; }
        echo $((got - sent)) >>"$tmp/latencies"
    done
    for pid in "$receiver" "$sender"; do kill -TERM "$pid"; wait "$pid" || true; done
    others=()
    # p50, p99 and max of the microseconds in file $1, in ms.
    quantiles() {
        sort -n "$1" | awk '{v[NR] = $1} END {
            printf "p50 %.1f ms, p99 %.1f ms, max %.1f ms", v[int((NR - 1) * 0.50) + 1] / 1000, v[int((NR - 1) * 0.99) + 1] / 1000, v[NR] / 1000 }'
    }
    echo "  send to receive (each \`app send\` start to the receiver printing it): $(quantiles "$tmp/latencies") over $messages (target: p50 under 250 ms)"
    echo "  the \`app send\` process alone (its start to its exit):              $(quantiles "$tmp/sends")"
fi
