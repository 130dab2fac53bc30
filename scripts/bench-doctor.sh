#!/usr/bin/env bash
# Benchmark `app doctor` and `app doctor --fix` on 100 stale worktrees (instances killed with
# SIGKILL), against `git worktree remove --force` on 100 worktrees of the same repository made
# by `git worktree add`, in the same run. Both sides remove 100 worktrees; doctor also checks
# each for unsaved work, deletes the empty branches and unregisters. Every fourth instance
# leaves uncommitted work, which doctor saves on a rescue ref first.
#
#   scripts/bench-doctor.sh      BENCH_WORKTREES=N (default 100); BENCH_FILES=N (default 500)
#                                files in the repository; TMPDIR picks the file system.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
make_repo=$(dirname "$root")/shared/bench/make-repo.sh
count=${BENCH_WORKTREES:-100}
files=${BENCH_FILES:-500}
for value in "$count" "$files"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-doctor: BENCH_WORKTREES and BENCH_FILES must be positive integers, got '$value'" >&2; exit 2; }
done
if [[ ! -f $make_repo ]]; then
    echo "bench-doctor: skipped: $make_repo not found (it builds the benchmark repository)"
    exit 0
fi

cd "$root"
cargo build --release --quiet --bin app
app=$(realpath "${CARGO_TARGET_DIR:-target}/release/app")

tmp=$(mktemp -d)
cleanup() {
    if [[ -d $tmp/repo/.app ]]; then
        for pid in $(cd "$tmp/repo" && "$app" instance list --all 2>/dev/null | cut -d: -f2 | cut -d' ' -f1); do
            kill -KILL -- "-$pid" 2>/dev/null || true
        done
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
mkdir "$tmp/home"
export HOME=$tmp/home XDG_CONFIG_HOME=$tmp/home/.config GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
export APP_HOME=$tmp/home
repo=$tmp/repo
bash "$make_repo" "$repo" "$files" $((files / 100 + 1)) >/dev/null
cd "$repo"

now_us() { local t=${EPOCHREALTIME/[.,]/}; REPLY=$((10#$t)); }

echo "== $count stale instances =="
for ((i = 0; i < count; i++)); do
    if ((i % 4 == 0)); then work='echo draft > draft.txt; '; else work=; fi
    # In a subshell, so this script gets no job notices; setsid: a process group each.
    (setsid "$app" run --instance "stale-$i" -- sh -c "${work}exec sleep 600" >/dev/null 2>&1 &)
done
for _ in $(seq 600); do
    running=$("$app" instance list 2>/dev/null | wc -l)
    ((running == count)) && break
    sleep 0.1
done
((running == count)) || { echo "bench-doctor: FAILED: only $running of $count instances started" >&2; exit 1; }
drafts=$(((count + 3) / 4))
for _ in $(seq 600); do
    written=$(find .app/worktrees -maxdepth 2 -name draft.txt | wc -l)
    ((written == drafts)) && break
    sleep 0.1
done
((written == drafts)) || { echo "bench-doctor: FAILED: only $written of $drafts drafts written" >&2; exit 1; }
# SIGKILL every supervisor with its command (the instance list gives "ID:PID" lines).
for pid in $("$app" instance list | cut -d: -f2); do
    kill -KILL -- "-$pid" 2>/dev/null || true
done
sleep 0.5

now_us; start=$REPLY
"$app" doctor >/dev/null && { echo "bench-doctor: FAILED: doctor found nothing" >&2; exit 1; }
now_us; diagnose_us=$((REPLY - start))

# Wall time is what a user waits; CPU time (user + system, bash's `time`, children included)
# is what each side costs, and stays comparable on a loaded machine.
TIMEFORMAT='%U %S'
cpu_ms() { awk '{ printf "%d", ($1 + $2) * 1000 }' "$1"; }
now_us; start=$REPLY
{ time "$app" doctor --fix >"$tmp/fix.out"; } 2>"$tmp/fix.cpu" || { cat "$tmp/fix.out" >&2; echo "bench-doctor: FAILED: doctor --fix left problems" >&2; exit 1; }
now_us; fix_us=$((REPLY - start))
fix_cpu=$(cpu_ms "$tmp/fix.cpu")
left=$(find .app/worktrees -mindepth 1 -maxdepth 1 | wc -l)
rescued=$(git for-each-ref refs/app/rescue | wc -l)
((left == 0)) || { echo "bench-doctor: FAILED: $left worktrees left" >&2; exit 1; }
((rescued == drafts)) || { echo "bench-doctor: FAILED: $rescued rescue refs, expected $drafts" >&2; exit 1; }

echo "== git worktree remove --force on $count worktrees =="
for ((i = 0; i < count; i++)); do
    git worktree add -q -b "plain-$i" "$tmp/plain-$i" >/dev/null 2>&1
done
now_us; start=$REPLY
{ time for ((i = 0; i < count; i++)); do
    git worktree remove --force "$tmp/plain-$i"
done; } 2>"$tmp/git.cpu"
now_us; git_us=$((REPLY - start))
git_cpu=$(cpu_ms "$tmp/git.cpu")

awk -v n="$count" -v d="$diagnose_us" -v f="$fix_us" -v g="$git_us" -v r="$rescued" -v fc="$fix_cpu" -v gc="$git_cpu" 'BEGIN {
    printf "  app doctor         %8.1f ms  (finds %d dead instances)\n", d / 1000, n
    printf "  app doctor --fix   %8.1f ms  (%d rescued, %d removed, branches deleted, unregistered), cpu %d ms\n", f / 1000, r, n, fc
    printf "  git worktree remove --force x%d  %8.1f ms, cpu %d ms\n", n, g / 1000, gc
    printf "  doctor --fix / git remove: %.2fx wall, %.2fx cpu\n", f / g, fc / gc
}'
