#!/usr/bin/env bash
# Benchmark plan validation: `app orchestrate --dry-run` of a chain of N tasks (t0 <- t1 <- ...,
# each depending on the previous) against a chain of 2N, in the same run. Validation (ids,
# dependencies, cycles, waves, lines for errors) is linear, so the ratio should be about 2
# (4 would be quadratic); the JSON parse of the same file by python3 is printed as a baseline.
#
#   scripts/bench-plan.sh   BENCH_TASKS=N (default 10000), BENCH_ROUNDS=N (default 3, best kept),
#                           BENCH_APP=PATH (an app binary to use instead of building a release one)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
tasks=${BENCH_TASKS:-10000}
rounds=${BENCH_ROUNDS:-3}
for value in "$tasks" "$rounds"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-plan: $value is not a positive number" >&2; exit 2; }
done
cd "$root"
if [[ -n ${BENCH_APP:-} ]]; then
    app=$(realpath "$BENCH_APP")
else
    cargo build --release --quiet --bin app
    app=$(realpath "${CARGO_TARGET_DIR:-target}/release/app")
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$work" init -q -b main repo
git -C "$work/repo" -c user.name=b -c user.email=b@example.invalid commit -q --allow-empty -m first
export APP_HOME="$work/home"

chain() { # chain N FILE
    python3 - "$1" "$2" <<'PY'
import json, sys
n, path = int(sys.argv[1]), sys.argv[2]
tasks = [{"id": "t0", "command": "true"}]
tasks += [{"id": f"t{i}", "command": "true", "depends_on": [f"t{i-1}"]} for i in range(1, n)]
json.dump({"name": "chain", "tasks": tasks}, open(path, "w"), indent=1)
PY
}

best() { # best COMMAND...: the fastest of $rounds runs, in seconds
    local best=""
    for _ in $(seq "$rounds"); do
        local start end took
        start=$(date +%s.%N)
        "$@" > /dev/null
        end=$(date +%s.%N)
        took=$(echo "$end - $start" | bc)
        if [[ -z $best ]] || (( $(echo "$took < $best" | bc) )); then best=$took; fi
    done
    echo "$best"
}

chain "$tasks" "$work/n.json"
chain $((2 * tasks)) "$work/2n.json"
cd "$work/repo"
one=$(best "$app" orchestrate --dry-run --plan "$work/n.json")
two=$(best "$app" orchestrate --dry-run --plan "$work/2n.json")
parse=$(best python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$work/2n.json")
printf 'dry run, %d-task chain:  %.3f s\n' "$tasks" "$one"
printf 'dry run, %d-task chain: %.3f s\n' $((2 * tasks)) "$two"
printf 'ratio 2N / N: %.2f (linear: about 2; quadratic: about 4)\n' "$(echo "$two / $one" | bc -l)"
printf 'baseline, python3 json.load of the %d-task file: %.3f s\n' $((2 * tasks)) "$parse"
