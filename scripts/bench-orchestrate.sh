#!/usr/bin/env bash
# Benchmark `app orchestrate`, each figure against a baseline measured in the same run:
#   (a) BENCH_TASKS_A (default 100) independent tasks of `sleep 0.1`, BENCH_PARALLEL (default 8)
#       at once, in a small repository (one empty commit), against `xargs -P` running the same
#       sleeps: app's overhead per task, (app - xargs) / tasks (target: under 50 ms);
#   (b) BENCH_TASKS_B (default 32) tasks of `true` on the 5,000-file / 50 MB repository of
#       ../shared/bench/make-repo.sh, BENCH_PARALLEL at once, against `xargs -P` doing, per job,
#       `git worktree add -b`, the command and `git worktree remove` with the git CLI (without
#       --force: like app, git then checks the worktree holds no changes before removing it):
#       the ratio app / git over BENCH_ROUNDS rounds that alternate which side goes first (target:
#       at most 1.1x). Each side runs one untimed round first.
#       Branches: app keeps every task's branch (the orchestrator makes them; they are the
#       run's results), so the baseline keeps its branches too: neither side deletes a branch,
#       inside or outside the timing. app removes each clean task worktree itself.
# Skipped (b) when make-repo.sh is missing. TMPDIR picks the file system.
#
# What the file system does to (b), measured with perf and by switching app's fsyncs off:
# - tmpfs (TMPDIR=/dev/shm) shows the tools' own costs: app 0.95x.
# - ext4 with a journal (the usual one): app 1.05x. app makes every shared file durable (temp
#   file, fsync, rename: DESIGN.md promise 1), about 20 fsyncs per task, and each one waits for
#   a journal commit that also carries the other jobs' thousands of new files; the git CLI
#   fsyncs nothing here. With app's fsyncs switched off the same runs were 0.90x-0.96x. It was
#   1.16x-1.21x while the registry lock was held across those commits.
# - ext4 without a journal (some VMs' /): most of the time goes to the kernel's
#   recently_deleted() check, which makes every new inode skip the inodes deleted in the last
#   ~30 s of its block group. A file then costs what the jobs deleted just before it, whichever
#   tool deleted them, and one round swings from 0.6x to 1.4x. The script says so when it sees
#   such a file system.
#
#   scripts/bench-orchestrate.sh   BENCH_TASKS_A=N (default 100), BENCH_TASKS_B=N (default 32),
#                                  BENCH_PARALLEL=N (default 8), BENCH_ROUNDS=N (default 3) of (b)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
make_repo=$(dirname "$root")/shared/bench/make-repo.sh
tasks_a=${BENCH_TASKS_A:-100}
tasks_b=${BENCH_TASKS_B:-32}
parallel=${BENCH_PARALLEL:-8}
rounds=${BENCH_ROUNDS:-3}
for value in "$tasks_a" "$tasks_b" "$parallel" "$rounds"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-orchestrate: BENCH_TASKS_A, BENCH_TASKS_B, BENCH_PARALLEL and BENCH_ROUNDS must be positive integers, got '$value'" >&2; exit 2; }
done

cd "$root"
cargo build --release --quiet --bin app
app=$(realpath "${CARGO_TARGET_DIR:-target}/release/app")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Isolate from the user's git configuration and app state (libgit2 reads $HOME itself).
mkdir "$tmp/home"
export HOME=$tmp/home XDG_CONFIG_HOME=$tmp/home/.config GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
export APP_HOME=$tmp/home/app
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@invalid GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@invalid

# Microsecond wall clock, without forking (bash 5's EPOCHREALTIME; the decimal mark may be ',').
now_us() { local t=${EPOCHREALTIME/[.,]/}; REPLY=$((10#$t)); }

# Writes a plan of $2 tasks all running command $3 (a JSON value), $parallel at once, to $1.
plan() {
    local i
    {
        printf '{"name": "bench", "max_concurrent": %d, "tasks": [' "$parallel"
        for ((i = 1; i <= $2; i++)); do
            ((i == 1)) || printf ', '
            printf '{"id": "t%d", "command": %s}' "$i" "$3"
        done
        printf ']}\n'
    } >"$1"
}

# Runs the plan in file $1 in the current repository; REPLY = wall time in microseconds.
# (Not a command substitution: set -e would not stop the script when app fails in one.)
time_app() {
    local t0
    now_us; t0=$REPLY
    "$app" orchestrate --plan "$1" --progress none >/dev/null
    now_us; REPLY=$((REPLY - t0))
}

# The baseline's job $1 of round $2: what app does per task, with the git CLI.
# The git CLI is not safe to run concurrently: `git worktree add` and `remove` read every
# worktree's admin files and die on one that another git is still writing ("fatal: failed to
# read .git/worktrees/<name>/commondir: Success"). Such a step is retried (its cost stays in the
# time); the errors go to $tmp/git-errors and are counted in the results.
git_job() {
    local dir=$tmp/git-wt/$2-$1 branch=bench/$2/$1 try
    for try in 1 2 3 4 5; do
        if ((try > 1)) && git show-ref -q --verify "refs/heads/$branch"; then
            git worktree add -q "$dir" "$branch"   # the failed try made the branch already
        else
            git worktree add -q -b "$branch" "$dir" HEAD
        fi 2>>"$tmp/git-errors" && break
        ((try < 5)) || return 1
    done
    (cd "$dir" && true)
    for try in 1 2 3 4 5; do
        git worktree remove "$dir" 2>>"$tmp/git-errors" && break
        ((try < 5)) || return 1
    done
}
export -f git_job
export tmp
# Runs round $1 of the baseline; stops the script, showing git's errors, when a job failed.
git_round() {
    : >"$tmp/git-errors"
    seq "$tasks_b" | xargs -P"$parallel" -I{} bash -c "git_job {} $1" || {
        echo "bench-orchestrate: FAILED: the git CLI baseline failed:" >&2
        sed 's/^/  /' "$tmp/git-errors" >&2
        exit 1
    }
}

echo "orchestrate benchmark: repositories on $(stat -f -c %T "$tmp") ($tmp), $(nproc) CPUs"
# ext4 keeps a journal when the kernel runs a jbd2 thread for its device.
device=$(findmnt -no SOURCE -T "$tmp" 2>/dev/null || true)
if [[ $(findmnt -no FSTYPE -T "$tmp" 2>/dev/null) == ext4 && -n $device ]] \
    && ! compgen -G "/proc/fs/jbd2/${device##*/}-*" >/dev/null; then
    echo "  note: ext4 without a journal: (b) is dominated by the kernel skipping recently deleted"
    echo "  inodes and swings between runs (see the top of this script); TMPDIR=/dev/shm measures the tools"
fi
echo "== (a) $tasks_a tasks of 'sleep 0.1', $parallel at once, small repository =="
git init -q "$tmp/small"
git -C "$tmp/small" commit -q --allow-empty -m start
plan "$tmp/a.json" "$tasks_a" '"sleep 0.1"'
cd "$tmp/small"
time_app "$tmp/a.json"; app_us=$REPLY
now_us; t0=$REPLY
seq "$tasks_a" | xargs -P"$parallel" -I{} sleep 0.1
now_us; xargs_us=$((REPLY - t0))
awk -v a="$app_us" -v x="$xargs_us" -v n="$tasks_a" -v p="$parallel" 'BEGIN {
    printf "  %-36s %8.1f ms\n", "app orchestrate", a / 1000
    printf "  %-36s %8.1f ms\n", "xargs -P" p " sleep 0.1", x / 1000
    printf "  overhead per task %.1f ms (target: under 50 ms)\n", (a - x) / n / 1000 }'

echo "== (b) $tasks_b tasks of 'true', $parallel at once, 5,000-file repository =="
if [[ ! -f $make_repo ]]; then
    echo "  skipped: $make_repo not found (it builds the benchmark repository)"
    exit 0
fi
bash "$make_repo" "$tmp/big" 5000 50 | sed 's/^/  /'
cd "$tmp/big"
plan "$tmp/b.json" "$tasks_b" '["true"]'
# One untimed round of each first, so both start with a warm page cache and a packed-refs
# file that is equally full. Then BENCH_ROUNDS timed rounds, alternating which side goes first
# (each side's file creation runs right after the other's deletions in turn): the ratio is
# that of the summed times, each round's shown too.
time_app "$tmp/b.json"
git_round warm
app_total=0 git_total=0 retries=0 ratios=()
for ((round = 1; round <= rounds; round++)); do
    for side in $( ((round % 2)) && echo "app git" || echo "git app"); do
        if [[ $side == app ]]; then
            time_app "$tmp/b.json"; app_us=$REPLY
        else
            now_us; t0=$REPLY
            git_round "r$round"
            now_us; git_us=$((REPLY - t0))
            retries=$((retries + $(grep -c '^fatal:' "$tmp/git-errors" || true)))
        fi
    done
    app_total=$((app_total + app_us)) git_total=$((git_total + git_us))
    ratios+=("$(awk -v a="$app_us" -v g="$git_us" 'BEGIN {printf "%.2fx", a / g}')")
done

# Both sides must have removed every worktree they made, and kept every branch.
leftovers=$(git worktree list --porcelain | grep '^worktree ' | tail -n +2 || true)
if [[ -n $leftovers ]]; then
    echo "bench-orchestrate: FAILED: worktrees left behind:" >&2
    echo "$leftovers" | sed 's/^/  /' >&2
    exit 1
fi
branches=$(git for-each-ref --format=x refs/heads/app/ refs/heads/bench/ | wc -l)
if ((branches != 2 * (rounds + 1) * tasks_b)); then
    echo "bench-orchestrate: FAILED: expected $((2 * (rounds + 1) * tasks_b)) app/* and bench/* branches, found $branches" >&2
    exit 1
fi

awk -v a="$app_total" -v g="$git_total" -v p="$parallel" -v r="$retries" -v n="$rounds" -v each="${ratios[*]}" 'BEGIN {
    printf "  %-36s %8.1f ms per round (%d rounds)\n", "app orchestrate", a / n / 1000, n
    printf "  %-36s %8.1f ms per round  (%d git steps retried after concurrent-use errors)\n", "xargs -P" p " git worktree add/remove", g / n / 1000, r
    printf "  ratio %.2fx (app / git CLI, summed over the rounds; each round: %s; target: at most 1.1x)\n", a / g, each }'
