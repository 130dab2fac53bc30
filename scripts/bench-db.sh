#!/usr/bin/env bash
# Benchmark app's database layer against Python's sqlite3 on the same workload, in one run:
# 8 writer processes adding notes to one WAL database, one BEGIN IMMEDIATE transaction per note,
# synchronous=NORMAL and a 5 s busy timeout on both sides, into the same schema (app creates
# it; its full-text triggers fire for both). Prints both throughputs and the ratio
# (target: app at least 0.9x), then single-process search latency at 10k and 100k notes.
#
#   scripts/bench-db.sh      BENCH_ROUNDS=N (default 3) rounds, alternating which side goes
#                            first; BENCH_NOTES=N notes per writer (default 1000); TMPDIR picks
#                            the file system.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
rounds=${BENCH_ROUNDS:-3}
per_writer=${BENCH_NOTES:-1000}
writers=8
for value in "$rounds" "$per_writer"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-db: BENCH_ROUNDS and BENCH_NOTES must be positive integers, got '$value'" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "bench-db: skipped: python3 (the baseline) is missing"; exit 0; }

cd "$root"
cargo build --release --quiet --example db_bench
bench=$(realpath "${CARGO_TARGET_DIR:-target}/release/examples/db_bench")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/writer.py" <<'PY'
import sqlite3, sys, time, uuid
db, count, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = sqlite3.connect(db, timeout=5.0, isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL").fetchall()
conn.execute("PRAGMA synchronous = NORMAL")
conn.execute("PRAGMA foreign_keys = ON")
start = time.time_ns()
for i in range(count):
    content = f"{name} note {i} about the cargo lock and the schema migration"
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err):
                raise
    conn.execute(
        "INSERT INTO notes (uid, namespace, content, author, host, repo_root, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uid) DO NOTHING",
        (uuid.uuid4().hex, "bench:notes", content, name, "bench", None, now),
    )
    conn.execute("COMMIT")
print(start, time.time_ns())
PY

# Runs one side's 8 writers on a fresh database; prints notes per second over the span from
# the first writer's start to the last one's end (process start-up excluded on both sides).
run_side() {
    local side=$1 db=$tmp/$1-$2.db pids=() i
    "$bench" write "$db" 1 setup >/dev/null    # app creates the schema for both sides
    for ((i = 0; i < writers; i++)); do
        if [[ $side == app ]]; then
            "$bench" write "$db" "$per_writer" "w$i" >"$tmp/$side.$i.out" &
        else
            python3 "$tmp/writer.py" "$db" "$per_writer" "w$i" >"$tmp/$side.$i.out" &
        fi
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    rows=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"select count(*) from notes where namespace='bench:notes'\").fetchone()[0])" "$db")
    [[ $rows == $((writers * per_writer + 1)) ]] || { echo "bench-db: FAILED: $side wrote $rows rows, expected $((writers * per_writer + 1))" >&2; exit 1; }
    cat "$tmp"/"$side".*.out | awk -v n=$((writers * per_writer)) '
        NR == 1 || $1 < lo {lo = $1} NR == 1 || $2 > hi {hi = $2}
        END {printf "%.0f\n", n / ((hi - lo) / 1e9)}'
    rm -f "$db" "$db"-wal "$db"-shm "$tmp"/"$side".*.out
}

app_rates=() py_rates=()
for ((r = 0; r < rounds; r++)); do
    if ((r % 2)); then
        py_rates+=("$(run_side python $r)"); app_rates+=("$(run_side app $r)")
    else
        app_rates+=("$(run_side app $r)"); py_rates+=("$(run_side python $r)")
    fi
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
app_rate=$(median "${app_rates[@]}")
py_rate=$(median "${py_rates[@]}")

echo "database benchmark: $writers writer processes x $per_writer notes, one transaction each, WAL, $rounds rounds (median)"
echo "  app (libsql)          $app_rate notes/s   (rounds: ${app_rates[*]})"
echo "  python3 sqlite3       $py_rate notes/s   (rounds: ${py_rates[*]})"
awk -v a="$app_rate" -v p="$py_rate" 'BEGIN {printf "ratio: %.2fx (app / python sqlite3; target: at least 0.9x)\n", a / p}'
echo
echo "notes search, one process (every word occurs in about 1 note in 5: a heavy case for ranking):"
"$bench" search "$tmp/search.db" | sed 's/^/  /'
