#!/usr/bin/env bash
# Installs the official Python MCP client (PyPI package `mcp`, pinned with everything it pulls in
# by tests/mcp/requirements.txt) into a virtual environment for tests/mcp/client.py, and prints
# that environment's python on stdout:
#
#   py=$(scripts/install-mcp-client.sh)
#   "$py" tests/mcp/client.py target/debug/app WORKTREE_A WORKTREE_B
#
# The environment is ${CARGO_TARGET_DIR:-target}/mcp-venv: target/ of the repository, or
# CARGO_TARGET_DIR taken as cargo takes it (relative to the current directory). A second run with
# the same requirements does nothing (in a fraction of a second). PYTHON picks
# the interpreter (default python3, 3.10 or newer). Where `python3 -m venv` cannot install pip
# (no ensurepip, as with Debian's python3 without python3-venv), the environment is made without
# pip and the interpreter's own pip installs into it. Needs no network beyond PyPI.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
target=${CARGO_TARGET_DIR:-$root/target}
[[ $target == /* ]] || target=$PWD/$target
venv=$target/mcp-venv
requirements=$root/tests/mcp/requirements.txt
python=${PYTHON:-python3}
stamp=$venv/.requirements.sha256
pip_flags=(--disable-pip-version-check --no-input --quiet)

say() { echo "install-mcp-client: $*" >&2; }

[[ -f $requirements ]] || { say "$requirements is missing"; exit 1; }
mcp_version=$(sed -n 's/^mcp==\([^[:space:]]*\).*/\1/p' "$requirements")
[[ -n $mcp_version ]] || { say "$requirements pins no mcp==VERSION"; exit 1; }
want=$(sha256sum "$requirements" | cut -d' ' -f1)

# Up to date: the same requirements went in, and the interpreter still runs and sees that mcp.
up_to_date() {
    [[ -x $venv/bin/python && -f $stamp && $(<"$stamp") == "$want" ]] || return 1
    local have
    have=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mcp"))' 2>/dev/null) ||
        return 1
    [[ $have == "$mcp_version" ]]
}

mkdir -p "$target"
# One installer at a time (tests may start several); the fast path below takes no time under it.
exec 9>"$target/mcp-venv.lock"
flock 9

if up_to_date; then
    say "mcp==$mcp_version already installed in $venv"
    echo "$venv/bin/python"
    exit 0
fi

command -v "$python" >/dev/null || { say "'$python' not found; set PYTHON to a Python 3 interpreter"; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { say "$("$python" --version 2>&1) is too old; mcp needs Python 3.10 or newer"; exit 1; }

say "creating $venv with $("$python" --version 2>&1) ($(command -v "$python"))"
rm -rf "$venv"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$python" -m venv "$venv" >"$log" 2>&1; then
    # Typically "ensurepip is not available". Make the environment without pip and let the
    # interpreter's own pip (22.3 or newer knows --python) put pip into it.
    say "'$python -m venv' failed; trying without ensurepip. Its output:"
    sed 's/^/    /' "$log" >&2
    rm -rf "$venv"
    if ! "$python" -m pip --version >/dev/null 2>&1; then
        say "'$python' has neither ensurepip nor pip: install Debian's python3-venv (or python3-pip)"
        exit 1
    fi
    "$python" -m venv --without-pip "$venv"
    say "installing pip into $venv with $("$python" -m pip --version | cut -d' ' -f1-2)"
    "$python" -m pip "${pip_flags[@]}" --python "$venv/bin/python" install pip || {
        say "could not install pip into $venv ('$python -m pip' needs to be 22.3 or newer for --python)"
        rm -rf "$venv"
        exit 1
    }
fi

say "installing mcp==$mcp_version and its pinned dependencies from $requirements"
"$venv/bin/python" -m pip "${pip_flags[@]}" install --require-virtualenv -r "$requirements" >&2
"$venv/bin/python" -c 'import mcp.client.stdio, mcp.client.session' ||
    { say "mcp==$mcp_version installed but does not import"; exit 1; }
echo "$want" >"$stamp"
say "done: mcp==$mcp_version in $venv"
echo "$venv/bin/python"
