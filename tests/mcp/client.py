#!/usr/bin/env python3
"""An independent client test of `app mcp`, through the official Python MCP SDK (PyPI `mcp`).

Usage: client.py APP_BIN WORKTREE_A WORKTREE_B

Starts `APP_BIN mcp` twice over stdio, server A with its working directory in WORKTREE_A and
server B in WORKTREE_B (two worktrees of live `app run` instances of one repository), each with
this process's whole environment less APP_INSTANCE_ID, so that each identifies itself by its
working directory. Then it initializes both, lists their tools, and calls every tool in one
scenario between the two: identity, instances, messages, locks, path reservations, notes and the
run status, plus one malformed call. Exits 0 after printing `ok: N tool calls`, or 1 after
printing what failed: the step, the tool, its arguments and the server's answer. The whole run
is bounded by MCP_CLIENT_TIMEOUT seconds (default 60), plus the SDK's bounded server shutdown.
MCP_CLIENT_VERBOSE=1 prints every call and its answer on stderr.

Install the client with scripts/install-mcp-client.sh and run this with the python it prints.
"""

import asyncio
import json
import os
import sys
import tempfile
from contextlib import AsyncExitStack

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

try:  # mcp 2.x
    from mcp.shared.exceptions import MCPError
except ImportError:  # mcp 1.x
    from mcp.shared.exceptions import McpError as MCPError

OVERALL_TIMEOUT = float(os.environ.get("MCP_CLIENT_TIMEOUT", "60"))
CALL_TIMEOUT = 20.0
VERBOSE = os.environ.get("MCP_CLIENT_VERBOSE", "") not in ("", "0")
INVALID_PARAMS = -32602

TOOLS = [
    "whoami",
    "list_instances",
    "send_message",
    "receive_messages",
    "ack_message",
    "acquire_lock",
    "release_lock",
    "list_locks",
    "reserve_paths",
    "release_paths",
    "list_reservations",
    "check_paths",
    "remember",
    "recall",
    "run_status",
]


class Failure(Exception):
    pass


def field(obj, snake, camel):
    """A result attribute under the SDK's spelling: snake_case in mcp 2.x, camelCase in 1.x."""
    return getattr(obj, snake) if hasattr(obj, snake) else getattr(obj, camel)


def short(value, limit=600):
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class Progress:
    step = "starting"
    calls = 0


progress = Progress()


def step(name):
    progress.step = name


def check(condition, message):
    if not condition:
        raise Failure(message)


def keys(obj, names, what):
    check(isinstance(obj, dict), f"{what}: expected an object, got {short(obj)}")
    missing = [name for name in names if name not in obj]
    check(not missing, f"{what}: missing {missing} in {short(obj)}")


def holder_of(entry):
    """The holder as text, whatever its shape (an id string, or an object naming the instance)."""
    return json.dumps(entry.get("holder"), sort_keys=True)


class Server:
    def __init__(self, label, session, worktree):
        self.label = label
        self.session = session
        self.worktree = worktree
        self.id = None

    async def raw(self, tool, args):
        progress.calls += 1
        if VERBOSE:
            print(f"-> {self.label}.{tool} {json.dumps(args)}", file=sys.stderr)
        try:
            result = await self.session.call_tool(tool, args, read_timeout_seconds=CALL_TIMEOUT)
        except MCPError as error:
            if VERBOSE:
                print(f"<- MCP error {error.code}: {error.message}", file=sys.stderr)
            raise
        except Exception as error:
            raise Failure(
                f"{self.label}.{tool}({short(args)}) raised {type(error).__name__}: {error}"
            ) from error
        if VERBOSE:
            error = " (isError)" if field(result, "is_error", "isError") else ""
            print(f"<-{error} {self.text_of(result)}", file=sys.stderr)
        return result

    @staticmethod
    def text_of(result):
        content = result.content
        if not content or getattr(content[0], "type", None) != "text":
            return None
        return content[0].text

    async def call(self, tool, args=None):
        """A call that must succeed; returns its structured content, checked against its text."""
        args = {} if args is None else args
        what = f"{self.label}.{tool}({short(args)})"
        try:
            result = await self.raw(tool, args)
        except MCPError as error:
            raise Failure(f"{what}: MCP error {error.code}: {error.message}") from error
        text = self.text_of(result)
        if field(result, "is_error", "isError"):
            raise Failure(f"{what}: tool error: {text!r}")
        structured = field(result, "structured_content", "structuredContent")
        check(isinstance(structured, dict), f"{what}: structuredContent is not an object: {short(structured)}; text: {text!r}")
        check(text is not None, f"{what}: content[0] is not text: {short(str(result.content))}")
        try:
            parsed = json.loads(text)
        except ValueError:
            raise Failure(f"{what}: content[0].text is not JSON: {text!r}") from None
        check(parsed == structured, f"{what}: content[0].text {short(text)} differs from structuredContent {short(structured)}")
        return structured

    async def call_error(self, tool, args, *needles):
        """A call that must be a tool error (isError) whose text contains every needle."""
        what = f"{self.label}.{tool}({short(args)})"
        try:
            result = await self.raw(tool, args)
        except MCPError as error:
            raise Failure(f"{what}: expected a tool error (isError), got MCP error {error.code}: {error.message}") from error
        text = self.text_of(result)
        structured = field(result, "structured_content", "structuredContent")
        check(field(result, "is_error", "isError"), f"{what}: expected a tool error, got success: {short(structured if structured is not None else text)}")
        check(text, f"{what}: tool error without a text message: {short(str(result.content))}")
        for needle in needles:
            check(needle in text, f"{what}: tool error text lacks {needle!r}: {text!r}")
        return text


async def connect(stack, label, app_bin, worktree, env, errlog):
    params = StdioServerParameters(command=app_bin, args=["mcp"], env=env, cwd=worktree)
    read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
    session = await stack.enter_async_context(ClientSession(read, write, read_timeout_seconds=CALL_TIMEOUT))
    step(f"{label}: initialize")
    init = await session.initialize()
    capabilities = field(init, "capabilities", "capabilities")
    check(capabilities is not None and capabilities.tools is not None, f"{label}: initialize: the server declares no tools capability: {init}")
    return Server(label, session, worktree)


async def check_tool_list(server):
    step(f"{server.label}: tools/list")
    listing = await server.session.list_tools()
    tools = {tool.name: tool for tool in listing.tools}
    missing = [name for name in TOOLS if name not in tools]
    check(not missing, f"{server.label}: tools/list lacks {missing}; it lists {sorted(tools)}")
    for name in TOOLS:
        tool = tools[name]
        schema = field(tool, "input_schema", "inputSchema")
        check(isinstance(schema, dict) and schema.get("type") == "object", f"{server.label}: tools/list: {name} inputSchema is not of type object: {short(schema)}")
        check(bool(tool.description and tool.description.strip()), f"{server.label}: tools/list: {name} has an empty description")


async def scenario(app_bin, worktree_a, worktree_b, errlogs):
    env = dict(os.environ)
    env.pop("APP_INSTANCE_ID", None)
    async with AsyncExitStack() as stack:
        step("A: start")
        a = await connect(stack, "A", app_bin, worktree_a, env, errlogs["A"])
        step("B: start")
        b = await connect(stack, "B", app_bin, worktree_b, env, errlogs["B"])
        await check_tool_list(a)
        await check_tool_list(b)

        # Identity: each server is the instance whose worktree it runs in.
        for server in (a, b):
            step(f"{server.label}: whoami")
            me = await server.call("whoami")
            keys(me, ["id", "branch", "worktree", "cwd", "pid", "status", "liveness"], f"{server.label}.whoami")
            check(isinstance(me["id"], str) and me["id"], f"{server.label}.whoami: empty id: {short(me)}")
            real = os.path.realpath(server.worktree)
            check(os.path.realpath(me["worktree"]) == real, f"{server.label}.whoami: worktree {me['worktree']!r} is not {real!r}")
            check(os.path.realpath(me["cwd"]) == real, f"{server.label}.whoami: cwd {me['cwd']!r} is not {real!r}")
            check(isinstance(me["pid"], int) and me["pid"] > 0, f"{server.label}.whoami: pid is not a positive integer: {short(me)}")
            check(me["liveness"] == "live", f"{server.label}.whoami: not live: {short(me)}")
            server.id = me["id"]
        check(a.id != b.id, f"A and B report the same instance id {a.id!r}")

        for server, other in ((a, b), (b, a)):
            step(f"{server.label}: list_instances")
            listed = await server.call("list_instances")
            keys(listed, ["instances"], f"{server.label}.list_instances")
            instances = listed["instances"]
            for entry in instances:
                keys(entry, ["id", "branch", "worktree", "status", "liveness", "pid", "command", "started_at", "heartbeat_at", "me"], f"{server.label}.list_instances entry")
            by_id = {entry["id"]: entry for entry in instances}
            for wanted in (server.id, other.id):
                check(wanted in by_id, f"{server.label}.list_instances: {wanted!r} not listed; got ids {sorted(by_id)}")
            mine = [entry["id"] for entry in instances if entry["me"] is True]
            check(mine == [server.id], f"{server.label}.list_instances: me=true on {mine}, expected only on {server.id!r}")

        # Messages: A to B, received, acknowledged, gone.
        step("A: send_message")
        payload = {"hello": "from A"}
        sent = await a.call("send_message", {"to": b.id, "payload": payload})
        keys(sent, ["id", "recipients"], "A.send_message")
        check(sent["recipients"] == [b.id], f"A.send_message: recipients {sent['recipients']!r}, expected [{b.id!r}]")
        message_id = sent["id"]

        step("B: receive_messages (wait 5 s)")
        received = await b.call("receive_messages", {"wait_seconds": 5})
        keys(received, ["messages"], "B.receive_messages")
        matching = [m for m in received["messages"] if m.get("id") == message_id]
        check(len(matching) == 1, f"B.receive_messages: message {message_id!r} not received once; got {short(received)}")
        message = matching[0]
        keys(message, ["id", "from", "type", "payload", "sent_at"], "B.receive_messages message")
        check(message["from"] == a.id, f"B.receive_messages: from {message['from']!r}, expected A's id {a.id!r}")
        check(message["payload"] == payload, f"B.receive_messages: payload {short(message['payload'])}, expected {short(payload)}")
        check(message["type"] == "text", f"B.receive_messages: type {message['type']!r}, expected the default 'text'")

        step("B: ack_message")
        acked = await b.call("ack_message", {"ids": [message_id]})
        keys(acked, ["acknowledged", "already_acknowledged"], "B.ack_message")
        check(acked["acknowledged"] == [message_id] and acked["already_acknowledged"] == [], f"B.ack_message: got {short(acked)}, expected {message_id!r} acknowledged")

        step("B: ack_message again")
        again = await b.call("ack_message", {"ids": [message_id]})
        check(again.get("acknowledged") == [] and again.get("already_acknowledged") == [message_id], f"B.ack_message (second time): got {short(again)}, expected {message_id!r} already acknowledged")

        step("B: receive_messages (wait 0)")
        empty = await b.call("receive_messages", {"wait_seconds": 0})
        check(empty.get("messages") == [], f"B.receive_messages after ack: expected no messages, got {short(empty)}")

        # A waiting receive wakes when a message arrives; a string payload is plain text.
        step("B: receive_messages (wait 10 s) while A sends a text")
        waiting = asyncio.ensure_future(b.call("receive_messages", {"wait_seconds": 10, "ack": True}))
        await asyncio.sleep(0.5)
        check(not waiting.done(), f"B.receive_messages with wait_seconds 10 returned before anything was sent: {short(waiting.result()) if waiting.done() and not waiting.exception() else waiting}")
        started = asyncio.get_running_loop().time()
        step("A: send_message text while B waits")
        sent = await a.call("send_message", {"to": b.id, "payload": "schema changed, rebase"})
        step("B: receive_messages wakes")
        woke = await waiting
        elapsed = asyncio.get_running_loop().time() - started
        texts = [m for m in woke.get("messages", []) if m.get("id") == sent["id"]]
        check(len(texts) == 1 and texts[0].get("payload") == "schema changed, rebase" and texts[0].get("type") == "text", f"B.receive_messages (waiting): expected the text message {sent['id']!r}, got {short(woke)}")
        check(elapsed < 5, f"B.receive_messages (waiting) returned {elapsed:.1f} s after the message was sent")
        step("B: receive_messages after ack=true")
        empty = await b.call("receive_messages", {})
        check(empty.get("messages") == [], f"B.receive_messages after receiving with ack=true: expected no messages, got {short(empty)}")

        # Locks: exclusive, fenced, handed over.
        step("A: acquire_lock schema")
        lock_a = await a.call("acquire_lock", {"name": "schema"})
        keys(lock_a, ["name", "token"], "A.acquire_lock")
        check(lock_a["name"] == "schema" and lock_a["token"] not in (None, ""), f"A.acquire_lock: got {short(lock_a)}")

        step("B: acquire_lock schema while A holds it")
        await b.call_error("acquire_lock", {"name": "schema"}, "schema", "held by")

        step("A: list_locks")
        locks = await a.call("list_locks")
        keys(locks, ["locks"], "A.list_locks")
        schema_locks = [lock for lock in locks["locks"] if lock.get("name") == "schema"]
        check(len(schema_locks) == 1, f"A.list_locks: expected one lock 'schema', got {short(locks)}")
        keys(schema_locks[0], ["name", "holder", "token", "lapsed"], "A.list_locks entry")
        check(a.id in holder_of(schema_locks[0]), f"A.list_locks: holder {holder_of(schema_locks[0])} does not name A ({a.id!r})")
        check(schema_locks[0]["token"] == lock_a["token"], f"A.list_locks: token {schema_locks[0]['token']!r}, acquired with {lock_a['token']!r}")
        # lapsed: null or false while held; the reason (or true) once the hold lapsed.
        check(schema_locks[0]["lapsed"] in (None, False), f"A.list_locks: a fresh lock is lapsed: {short(schema_locks[0])}")

        step("A: release_lock schema")
        released = await a.call("release_lock", {"name": "schema"})
        check(released.get("name") == "schema" and released.get("released") is True, f"A.release_lock: got {short(released)}")

        step("B: acquire_lock schema after A released it")
        lock_b = await b.call("acquire_lock", {"name": "schema"})
        keys(lock_b, ["name", "token"], "B.acquire_lock")
        check(lock_b["token"] not in (None, "") and lock_b["token"] != lock_a["token"], f"B.acquire_lock: token {lock_b['token']!r} (A's was {lock_a['token']!r})")
        if isinstance(lock_a["token"], int) and isinstance(lock_b["token"], int):
            check(lock_b["token"] > lock_a["token"], f"B.acquire_lock: fencing token {lock_b['token']} is not above A's {lock_a['token']}")

        step("B: release_lock schema")
        released = await b.call("release_lock", {"name": "schema"})
        check(released.get("released") is True, f"B.release_lock: got {short(released)}")

        # Path reservations.
        step("A: reserve_paths src/**")
        reservation = await a.call("reserve_paths", {"patterns": ["src/**"], "reason": "refactor"})
        keys(reservation, ["id", "patterns", "shared"], "A.reserve_paths")
        check(reservation["patterns"] == ["src/**"] and reservation["shared"] is False, f"A.reserve_paths: got {short(reservation)}")

        step("B: list_reservations")
        listing = await b.call("list_reservations")
        keys(listing, ["reservations"], "B.list_reservations")
        ours = [r for r in listing["reservations"] if r.get("patterns") == ["src/**"]]
        check(len(ours) == 1, f"B.list_reservations: expected one reservation of src/**, got {short(listing)}")
        keys(ours[0], ["id", "patterns", "shared", "holder", "reason"], "B.list_reservations entry")
        check(a.id in holder_of(ours[0]), f"B.list_reservations: holder {holder_of(ours[0])} does not name A ({a.id!r})")
        check(ours[0]["reason"] == "refactor" and ours[0]["shared"] is False, f"B.list_reservations: got {short(ours[0])}")

        step("B: check_paths src/main.rs while A reserves src/**")
        checked = await b.call("check_paths", {"paths": ["src/main.rs"]})
        keys(checked, ["ok", "conflicts"], "B.check_paths")
        check(checked["ok"] is False and len(checked["conflicts"]) == 1, f"B.check_paths: expected ok=false and one conflict, got {short(checked)}")
        conflict = checked["conflicts"][0]
        keys(conflict, ["path", "holder", "patterns", "reason"], "B.check_paths conflict")
        check(conflict["path"] == "src/main.rs" and a.id in holder_of(conflict) and "src/**" in conflict["patterns"] and conflict["reason"] == "refactor", f"B.check_paths: conflict {short(conflict)}")

        step("B: reserve_paths src/lib.rs inside A's reservation")
        await b.call_error("reserve_paths", {"patterns": ["src/lib.rs"]}, "reserved")

        step("A: release_paths")
        freed = await a.call("release_paths", {})
        keys(freed, ["released"], "A.release_paths")
        check(isinstance(freed["released"], int) and freed["released"] >= 1, f"A.release_paths: got {short(freed)}")

        step("B: check_paths after A released")
        checked = await b.call("check_paths", {"paths": ["src/main.rs"]})
        check(checked.get("ok") is True and checked.get("conflicts") == [], f"B.check_paths after release: got {short(checked)}")

        # Notes.
        step("A: remember")
        content = "the schema lives in db/"
        remembered = await a.call("remember", {"namespace": "test:mcp", "content": content})
        keys(remembered, ["note"], "A.remember")
        keys(remembered["note"], ["id", "namespace", "content"], "A.remember note")
        check(remembered["note"]["namespace"] == "test:mcp" and remembered["note"]["content"] == content, f"A.remember: got {short(remembered)}")

        step("B: recall")
        recalled = await b.call("recall", {"namespace": "test:mcp", "query": "schema"})
        keys(recalled, ["notes"], "B.recall")
        found = [n for n in recalled["notes"] if n.get("id") == remembered["note"]["id"]]
        check(len(found) == 1 and found[0].get("content") == content, f"B.recall: note {remembered['note']['id']!r} not found once; got {short(recalled)}")

        step("A: run_status")
        status = await a.call("run_status")
        check("run" in status and status["run"] is None, f"A.run_status: expected run null outside an orchestrated run, got {short(status)}")

        # Malformed arguments are refused, and the server goes on.
        step("A: send_message without 'to'")
        bad = {"payload": 1}
        try:
            result = await a.raw("send_message", bad)
        except MCPError as error:
            check(error.code == INVALID_PARAMS, f"A.send_message({short(bad)}): MCP error {error.code} ({error.message}), expected {INVALID_PARAMS} or a tool error")
        else:
            check(field(result, "is_error", "isError"), f"A.send_message({short(bad)}) was accepted: {short(Server.text_of(result) or '')}")

        step("A: whoami after the malformed call")
        me = await a.call("whoami")
        check(me.get("id") == a.id, f"A.whoami after the malformed call: got {short(me)}")
        step("closing")
    return progress.calls


def failures(error):
    """The leaves of an exception (group), as the task groups of the SDK may wrap them."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from failures(inner)
    else:
        yield error


def main(argv):
    if len(argv) != 4:
        print(f"usage: {argv[0]} APP_BIN WORKTREE_A WORKTREE_B", file=sys.stderr)
        return 2
    app_bin, worktree_a, worktree_b = argv[1:]
    for path in (worktree_a, worktree_b):
        if not os.path.isdir(path):
            print(f"fail: {path} is not a directory", file=sys.stderr)
            return 2
    # Each server's stderr goes to a file, shown afterwards under its label, so that a panic
    # (also one while the server shuts down, which the SDK does not report) fails the test.
    errlogs = {label: tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") for label in ("A", "B")}
    status = 0
    try:
        calls = asyncio.run(asyncio.wait_for(scenario(app_bin, worktree_a, worktree_b, errlogs), OVERALL_TIMEOUT))
    except (asyncio.TimeoutError, TimeoutError):
        print(f"fail: timed out after {OVERALL_TIMEOUT:.0f} s at step '{progress.step}'", file=sys.stderr)
        status = 1
    except BaseException as error:  # noqa: BLE001 - every failure is reported the same way
        if isinstance(error, KeyboardInterrupt):
            raise
        for leaf in failures(error):
            if isinstance(leaf, Failure):
                print(f"fail: at step '{progress.step}': {leaf}", file=sys.stderr)
            else:
                print(f"fail: at step '{progress.step}': {type(leaf).__name__}: {leaf}", file=sys.stderr)
        status = 1
    for label, errlog in errlogs.items():
        errlog.seek(0)
        text = errlog.read()
        if text.strip():
            print(f"--- server {label} stderr ---", file=sys.stderr)
            sys.stderr.write(text if text.endswith("\n") else text + "\n")
        if "panicked at" in text:
            print(f"fail: server {label} panicked (its stderr is above)", file=sys.stderr)
            status = 1
    if status == 0:
        print(f"ok: {calls} tool calls")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
