#!/usr/bin/env bash
# Record what a user sees from `app`: stdout, stderr and the exit code of every `--help`,
# `doctor --json` on a fixture repository, `instance list --json`, bad input, a spawn failure
# (127, 126) and a signal-cancelled run (130). Run it for two binaries and diff the two
# directories: a reshaping of the code must leave them identical.
#
#   scripts/behaviour-snapshot.sh OUT_DIR [APP_BINARY]   (default: a debug build of this checkout)
#   scripts/behaviour-snapshot.sh --compare BEFORE_BINARY [AFTER_BINARY]
#
# Paths, pids, times, host names and ports are replaced by placeholders, so two runs of one
# binary give identical files. The heartbeat is slowed to an hour so that no kill lands in the middle
# of a registry write.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

usage() {
    echo "usage: behaviour-snapshot.sh OUT_DIR [APP_BINARY] | --compare BEFORE_BINARY [AFTER_BINARY]" >&2
    exit 2
}

default_binary() {
    (cd "$root" && cargo build --quiet --bin app)
    realpath "${CARGO_TARGET_DIR:-$root/target}/debug/app"
}

if [[ ${1:-} == --compare ]]; then
    [[ $# -ge 2 && $# -le 3 ]] || usage
    before=$(realpath "$2")
    after=$(realpath "${3:-$(default_binary)}")
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    bash "$0" "$work/before" "$before" >/dev/null
    bash "$0" "$work/after" "$after" >/dev/null
    if diff -r "$work/before" "$work/after"; then
        echo "behaviour-snapshot: identical ($(find "$work/before" -type f | wc -l) files)"
    else
        echo "behaviour-snapshot: DIFFERENT (above: before <, after >)" >&2
        exit 1
    fi
    exit 0
fi

[[ $# -ge 1 && $# -le 2 ]] || usage
out=$1
binary=$(realpath "${2:-$(default_binary)}")
[[ -x $binary ]] || { echo "behaviour-snapshot: $binary is not an executable" >&2; exit 2; }
mkdir -p "$out"
out=$(realpath "$out")

tmp=$(mktemp -d)
cleanup() {
    pkill -KILL -f "$tmp/" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
# The binary is copied to bin/app so clap's usage line names `app` whatever the file is called.
mkdir -p "$tmp/bin" "$tmp/home"
cp "$binary" "$tmp/bin/app"
app=$tmp/bin/app

# A clean environment: nothing of the caller's APP_* or git settings leaks in.
run_env=(env -i "PATH=$tmp/bin:/usr/local/bin:/usr/bin:/bin" "HOME=$tmp/home" "APP_HOME=$tmp/home"
    "XDG_CONFIG_HOME=$tmp/home/.config" GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
    GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.com GIT_COMMITTER_NAME=t
    GIT_COMMITTER_EMAIL=t@example.com GIT_AUTHOR_DATE=2026-01-01T00:00:00Z
    GIT_COMMITTER_DATE=2026-01-01T00:00:00Z LC_ALL=C "APP_DB_PATH=$tmp/app.db"
    APP_HEARTBEAT_INTERVAL=1h APP_STALE_AFTER=30s)

host=$(hostname)
normalize() {
    sed -E \
        -e "s#$tmp#<TMP>#g" \
        -e "s#\b$host\b#<HOST>#g" \
        -e 's#[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9:]+)?#<TIME>#g' \
        -e 's#"(pid|child_pid|start_time|child_start_time|heartbeat|started_at|updated_at|created_at|at|port|ts|seq|boot_id|time)": ?("[^"]*"|[0-9]+)#"\1": <\1>#g' \
        -e 's#\b(pid|PID)(:? +)[0-9]+#\1\2<PID>#g' \
        -e 's#:[0-9]+( |$)#:<PID>\1#' \
        -e 's#[0-9]+(\.[0-9]+)?(ms|s|m|h) ago#<AGO>#g' \
        -e 's#\b[0-9a-f]{40}\b#<OID>#g' \
        -e 's#\b[0-9a-f]{7,12}\b#<SHORT>#g' \
        -e 's#[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}#<UUID>#g'
}

# record NAME DIR COMMAND...: stdout, stderr and exit code of COMMAND run in DIR.
record() {
    local name=$1 dir=$2 code=0
    shift 2
    (cd "$dir" && "${run_env[@]}" "$@") >"$tmp/stdout" 2>"$tmp/stderr" </dev/null || code=$?
    normalize <"$tmp/stdout" >"$out/$name.stdout"
    normalize <"$tmp/stderr" >"$out/$name.stderr"
    echo "$code" >"$out/$name.code"
}

# Every --help, found by walking the "Commands:" sections.
help_of() {
    local -a words=("$@")
    local name
    name=$(IFS=-; echo "help${words[*]:+-${words[*]}}")
    record "$name" "$tmp" "$app" "${words[@]}" --help
    local sub
    for sub in $(sed -n '/^Commands:/,/^$/p' "$out/$name.stdout" | awk 'NR > 1 && NF { print $1 }'); do
        [[ $sub == help ]] && continue
        help_of "${words[@]}" "$sub"
    done
}
help_of
record version "$tmp" "$app" --version

# The fixture repository: one commit, every kind of stale state doctor reports.
repo=$tmp/repo
git init -q -b main "$repo"
(cd "$repo" && "${run_env[@]}" sh -c 'echo one > f1 && echo two > f2 && git add . && git commit -qm init')

record run-clean "$repo" "$app" run --instance clean -- true
record run-exit-3 "$repo" "$app" run --instance three -- sh -c 'exit 3'
record spawn-not-found "$repo" "$app" run --instance missing -- ./no-such-command
printf 'echo hi\n' >"$tmp/not-executable.sh"
record spawn-not-executable "$repo" "$app" run --instance noexec -- "$tmp/not-executable.sh"
record bad-instance-name "$repo" "$app" run --instance 'bad name' -- true
record bad-duration "$repo" "$app" run --stop-timeout 5parsecs -- true
record bad-lock-name "$repo" "$app" lock acquire ''
record lock-list-empty "$repo" "$app" lock list
record reservations-empty "$repo" "$app" reservations

# A signal-cancelled run: SIGINT to the supervisor while its command runs.
(cd "$repo" && exec "${run_env[@]}" "$app" run --instance cancelled -- sleep 600) \
    >"$tmp/cancel.stdout" 2>"$tmp/cancel.stderr" &
cancel=$!
for _ in $(seq 100); do
    (cd "$repo" && "${run_env[@]}" "$app" instance list 2>/dev/null | grep -q '^cancelled:') && break
    sleep 0.1
done
sleep 0.3
kill -INT "$cancel"
code=0
wait "$cancel" || code=$?
normalize <"$tmp/cancel.stdout" >"$out/run-sigint.stdout"
normalize <"$tmp/cancel.stderr" >"$out/run-sigint.stderr"
echo "$code" >"$out/run-sigint.code"

# A live instance for `instance list`, and then a dead one (supervisor SIGKILLed) with unsaved
# work: started one after the other, so "oldest first" has one answer.
listed() { (cd "$repo" && "${run_env[@]}" "$app" instance list 2>/dev/null | grep -q "^$1:"); }
(cd "$repo" && exec "${run_env[@]}" "$app" run --instance live -- sleep 600) >/dev/null 2>&1 &
live=$!
for _ in $(seq 100); do listed live && break; sleep 0.1; done
(cd "$repo" && exec "${run_env[@]}" "$app" run --instance dead -- sh -c 'echo draft > draft.txt; exec sleep 600') \
    >/dev/null 2>&1 &
dead=$!
for _ in $(seq 100); do
    [[ -f $repo/.app/worktrees/dead/draft.txt && -S $repo/.app/run/dead.sock ]] && listed dead && break
    sleep 0.1
done
record instance-list "$repo" "$app" instance list
record instance-list-json "$repo" "$app" instance list --json
record instance-info "$repo" "$app" instance info live
# The supervisor first, so it cannot clean up after its command; then the orphaned command.
orphan=$(pgrep -P "$dead" || true)
kill -KILL "$dead"
wait "$dead" 2>/dev/null || true
[[ -n $orphan ]] && kill -KILL $orphan
sleep 0.2
: >"$repo/.app/.tmp-left-behind"
record doctor "$repo" "$app" doctor
record doctor-json "$repo" "$app" doctor --json
record doctor-fix-json "$repo" "$app" doctor --fix --json
record doctor-after-fix "$repo" "$app" doctor
(cd "$repo" && "${run_env[@]}" git for-each-ref --format='%(refname)' refs/app) | normalize >"$out/refs-after-fix"
record instance-stop "$repo" "$app" instance stop live
wait "$live" 2>/dev/null || true
record instance-list-after "$repo" "$app" instance list --all
echo "behaviour-snapshot: $(find "$out" -type f | wc -l) files in $out"
