#!/usr/bin/env bash
# The cost of agent-state detection per instance per tick (docs/AGENT-STATE.md) on the
# 5,000-file benchmark repository (../shared/bench/make-repo.sh DIR 5000 50), against one
# `git status --porcelain` of the same worktree (what a tick avoids), measured in the same run.
# Prints the first tick (watch setup and one full diff), a quiet tick, a tick after a one-file
# edit, git status, and the ratios.
#
#   scripts/bench-state.sh     BENCH_TICKS=N ticks per measurement (default 100); TMPDIR picks
#                              the file system.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
ticks=${BENCH_TICKS:-100}
[[ $ticks =~ ^[1-9][0-9]*$ ]] || { echo "bench-state: BENCH_TICKS must be a positive integer, got '$ticks'" >&2; exit 2; }
make_repo="$root/../shared/bench/make-repo.sh"
[ -x "$make_repo" ] || [ -f "$make_repo" ] || { echo "bench-state: skipped: $make_repo (the benchmark repository) is missing"; exit 0; }

cd "$root"
cargo build --release --quiet --example state_bench
bench=$(realpath "${CARGO_TARGET_DIR:-target}/release/examples/state_bench")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

bash "$make_repo" "$tmp/repo" 5000 50 >/dev/null
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
base=$(git -C "$tmp/repo" rev-parse HEAD)
# A linked worktree, as an instance has, so that the main root's .app/ is outside it.
git -C "$tmp/repo" worktree add -q -b bench "$tmp/wt" "$base"
git -C "$tmp/wt" status --porcelain >/dev/null   # warm the index and the page cache alike

echo "bench-state: $(df -T "$tmp" | awk 'NR==2 {print $2}') at $tmp, $ticks ticks"
"$bench" "$tmp/wt" "$base" "$ticks" | tee "$tmp/out"
awk '
    { v[$1] = $2 }
    END {
        printf "quiet tick / git status: %.4f (%.0fx cheaper)\n", v["quiet_tick_us"] / v["git_status_us"], v["git_status_us"] / v["quiet_tick_us"]
        printf "edit tick  / git status: %.4f (%.0fx cheaper)\n", v["edit_tick_us"] / v["git_status_us"], v["git_status_us"] / v["edit_tick_us"]
        printf "first tick / git status: %.2f\n", v["first_tick_us"] / v["git_status_us"]
    }' "$tmp/out"
