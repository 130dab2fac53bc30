#!/usr/bin/env bash
# Benchmark `app run -- true` (create worktree + branch, register, run, check clean, remove)
# against the git CLI doing the same worktree work, on the shared benchmark repository
# (../shared/bench/make-repo.sh: 5000 files, about 50 MB).
#
#   scripts/bench-worktree.sh            BENCH_RUNS=N (default 11) timed runs of each, after
#                                        one untimed warm-up; TMPDIR picks the filesystem.
#
# On a journal-less ext4 (this VM's /), creating 5000 files right after deleting 5000 makes the
# kernel's inode allocator dominate both sides; TMPDIR=/dev/shm shows the tools' own costs.
#
# Both sides run interleaved in one loop (alternating which goes first) so machine noise hits
# both alike. Target: app at most 1.0x the git CLI.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
make_repo=$(dirname "$root")/shared/bench/make-repo.sh
runs=${BENCH_RUNS:-11}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench: BENCH_RUNS must be a positive integer, got '$runs'" >&2; exit 2; }
if [[ ! -f $make_repo ]]; then
    echo "bench: skipped: $make_repo not found (it builds the benchmark repository)"
    exit 0
fi

cd "$root"
cargo build --release --quiet
app=$(realpath "${CARGO_TARGET_DIR:-target}/release/app")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Isolate from the user's git configuration (libgit2 reads $HOME and $XDG_CONFIG_HOME itself).
mkdir "$tmp/home"
export HOME=$tmp/home XDG_CONFIG_HOME=$tmp/home/.config GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
repo=$tmp/repo
git_wt=$tmp/git-wt
bash "$make_repo" "$repo" 5000 50
cd "$repo"

# Microsecond wall clock, without forking (bash 5's EPOCHREALTIME; the decimal mark may be ',').
now_us() { local t=${EPOCHREALTIME/[.,]/}; REPLY=$((10#$t)); }

app_us=() git_us=() git_del_us=()
time_app() {
    local t0 t1
    now_us; t0=$REPLY
    "$app" run -- true >/dev/null
    now_us; t1=$REPLY
    ((i == 0)) || app_us+=($((t1 - t0)))
}
time_git() {
    local t0 t1 t2
    now_us; t0=$REPLY
    git worktree add -q -b "bench/$i" "$git_wt"
    git worktree remove "$git_wt"
    now_us; t1=$REPLY
    git branch -q -D "bench/$i"     # app deletes its branch too: reported as a second baseline
    now_us; t2=$REPLY
    ((i == 0)) || { git_us+=($((t1 - t0))); git_del_us+=($((t2 - t0))); }
}

for ((i = 0; i <= runs; i++)); do   # i = 0 is the warm-up
    if ((i % 2)); then time_app; time_git; else time_git; time_app; fi
done

# Nothing may be left behind: no linked worktree, no app/* or bench/* branch.
leftovers=$(
    git worktree list --porcelain | grep '^worktree ' | tail -n +2 || true
    git for-each-ref --format='%(refname)' refs/heads/app/ refs/heads/bench/
    find .app/worktrees -mindepth 1 -maxdepth 1 2>/dev/null || true
)
if [[ -n $leftovers ]]; then
    echo "bench: FAILED: left behind after the runs:" >&2
    echo "$leftovers" | sed 's/^/  /' >&2
    exit 1
fi

# Median in milliseconds (one decimal) of microsecond samples.
median_ms() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.1f", m / 1000}'; }
range_ms() { printf '%s\n' "$@" | sort -n | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.0f-%.0f", lo / 1000, hi / 1000}'; }
app_ms=$(median_ms "${app_us[@]}")
git_ms=$(median_ms "${git_us[@]}")
git_del_ms=$(median_ms "${git_del_us[@]}")

echo
echo "worktree benchmark: $runs runs + 1 warm-up, interleaved; repository on $(stat -f -c %T "$tmp") ($tmp)"
printf '  %-44s median %8s ms  (range %s)\n' \
    "app run -- true" "$app_ms" "$(range_ms "${app_us[@]}")" \
    "git worktree add -b + git worktree remove" "$git_ms" "$(range_ms "${git_us[@]}")" \
    "  same + git branch -D" "$git_del_ms" "$(range_ms "${git_del_us[@]}")"
awk -v a="$app_ms" -v g="$git_ms" -v d="$git_del_ms" 'BEGIN {
    printf "ratio: %.2fx (app / git CLI; target: at most 1.0x)\n", a / g
    printf "ratio incl. branch -D: %.2fx\n", a / d }'
