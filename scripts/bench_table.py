#!/usr/bin/env python3
"""Helper of scripts/bench.sh: the parts that are easier in Python than in bash.

Subcommands (Python 3.11 standard library only):

  meta KEY=VALUE ...            JSON description of this machine and the run's settings
  procs [--reset-peak] ROLE=PID ...
                               JSON snapshot of processes: resident memory, peak resident
                               memory, CPU time, threads, open descriptors
  balanced WORKERS             reads `chatfleet status --json` on stdin; exit 0 when WORKERS
                               workers are live and every partition is owned, evenly
  idle-streams --url URL --streams K --proc ROLE=PID ... --out PATH
                               creates K sessions, opens K idle event streams and records
                               what they cost the given processes in resident memory
  retention --url URL --proc ROLE=PID ... --before PATH [--nats-monitor URL] --retention-secs S
            --messages N --out PATH
                               what the reply events kept for resuming cost after N replies:
                               resident memory against the --before snapshot, the NATS stream
                               CHATFLEET_OUT's size, and how long a resume takes
  fold-roles FOLDED ROLE=PID ... | ROLE
                               a perf profile folded by inferno-collapse-perf --pid, with each
                               stack's root named by its process's role (a lone ROLE names all)
  budget FOLDED                samples per role and step of a message (STEPS; LOADTEST_STEPS for
                               the load generator), as JSON, with the samples in the kernel and
                               the allocator and the most frequent frames no step marks
  report RESULTS_DIR --out PATH [--analysis PATH]
                               the tables of a run, printed and written as Markdown, with the
                               hand-written analysis (docs/benchmarks-analysis.md) pasted in

The loadtest's JSON field names are those of loadtest/src/report.rs (`Report`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ("direct", "relay", "dev", "fleet")
TARGET_TITLES = {
    "direct": "direct (mock-llm alone)",
    "relay": "relay (mock-llm --upstream: chatfleet's model client and an SSE relay, nothing kept)",
    "dev": "dev (one process)",
    "fleet": "fleet (gateway + 2 workers, NATS, MongoDB wire)",
}


# ---------------------------------------------------------------------------------------------
# machine


def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if not model:  # lscpu missing: /proc/cpuinfo says the same
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    meminfo = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        meminfo[key] = value.strip()
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "nproc": os.cpu_count() if not hasattr(os, "sched_getaffinity") else len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total": meminfo.get("MemTotal", ""),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_at_start": " ".join(loadavg),
    }


# ---------------------------------------------------------------------------------------------
# procs

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_snapshot(pid: int) -> dict:
    """Memory and CPU of one process from /proc; empty when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return {"pid": pid, "alive": False}
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()

    def kb(key: str) -> int:
        return int(fields.get(key, "0 kB").split()[0])

    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    after_comm = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(after_comm[11]), int(after_comm[12])  # fields 14 and 15 of stat
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return {
        "pid": pid,
        "alive": after_comm[0] != "Z",
        "rss_kb": kb("VmRSS"),
        "rss_anon_kb": kb("RssAnon"),
        "hwm_kb": kb("VmHWM"),
        "cpu_s": (utime + stime) / CLK_TCK,
        "threads": int(fields.get("Threads", "0")),
        "fds": fds,
    }


def parse_roles(items: list[str]) -> dict[str, int]:
    roles = {}
    for item in items:
        role, _, pid = item.partition("=")
        roles[role] = int(pid)
    return roles


def cmd_procs(args: argparse.Namespace) -> None:
    roles = parse_roles(args.roles)
    if args.reset_peak:
        # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+), so that the
        # peak read after the run is the run's own, not the start-up's or the warm-up's.
        for pid in roles.values():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass
    snap = {role: proc_snapshot(pid) for role, pid in roles.items()}
    snap["_time"] = time.time()
    print(json.dumps(snap, indent=1))


# ---------------------------------------------------------------------------------------------
# balanced


def cmd_balanced(args: argparse.Namespace) -> None:
    try:
        status = json.load(sys.stdin)
    except json.JSONDecodeError:
        sys.exit(1)
    workers = {w["worker"] for w in status.get("workers", [])}
    owners = [p.get("owner") for p in status.get("partitions", [])]
    if len(workers) != args.workers or not owners or any(o is None for o in owners):
        sys.exit(1)
    shares = [owners.count(w) for w in workers]
    sys.exit(0 if max(shares) - min(shares) <= 1 else 1)


# ---------------------------------------------------------------------------------------------
# idle-streams


async def http_call(host: str, port: int, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection (Connection: close); status and body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    header_blob, _, payload = raw.partition(b"\r\n\r\n")
    lines = header_blob.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    if any(line.lower().startswith("transfer-encoding:") and "chunked" in line.lower() for line in lines[1:]):
        payload = dechunk(payload)
    return status, payload


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


async def open_stream(host: str, port: int, session: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Opens a session's event stream and returns once its response headers say 200."""
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"GET /v1/sessions/{session['session_id']}/events HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer {session['token']}\r\n\r\n"
    )
    writer.write(request.encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        writer.close()
        raise RuntimeError(f"events: HTTP {status}")
    return reader, writer


async def idle_streams(args: argparse.Namespace) -> dict:
    url = args.url.removeprefix("http://").rstrip("/")
    host, _, port_text = url.partition(":")
    port = int(port_text)
    roles = parse_roles(args.proc)
    errors: dict[str, int] = {}

    def note(error: BaseException) -> None:
        kind = str(error) or type(error).__name__
        errors[kind] = errors.get(kind, 0) + 1

    # 1. The sessions, created first so that their cost is not counted as the streams'.
    gate = asyncio.Semaphore(50)

    async def create() -> dict | None:
        async with gate:
            try:
                status, body = await http_call(host, port, "POST", "/v1/sessions", {"Content-Type": "application/json"}, b"{}")
                if status != 201:
                    raise RuntimeError(f"create session: HTTP {status}")
                return json.loads(body)
            except Exception as error:  # noqa: BLE001 - counted, not fatal
                note(error)
                return None

    sessions = [s for s in await asyncio.gather(*(create() for _ in range(args.streams))) if s]
    await asyncio.sleep(args.settle)
    before = {role: proc_snapshot(pid) for role, pid in roles.items()}

    # 2. The streams, opened a bounded number at a time, then held open and idle: half of them,
    # measured, then the other half, measured again. The second half's growth of the anonymous
    # memory (RssAnon: heap and stacks, not mapped files) is the cost of a stream; the first
    # half also pays what any load makes a process keep (allocator arenas, runtime buffers).
    gate = asyncio.Semaphore(100)
    streams = []

    async def open_one(session: dict) -> None:
        async with gate:
            try:
                streams.append(await open_stream(host, port, session))
            except Exception as error:  # noqa: BLE001
                note(error)

    started = time.monotonic()
    half = len(sessions) // 2
    await asyncio.gather(*(open_one(s) for s in sessions[:half]))
    await asyncio.sleep(args.hold)
    first_half = len(streams)
    halfway = {role: proc_snapshot(pid) for role, pid in roles.items()}
    await asyncio.gather(*(open_one(s) for s in sessions[half:]))
    open_s = time.monotonic() - started - args.hold
    await asyncio.sleep(args.hold)
    opened = {role: proc_snapshot(pid) for role, pid in roles.items()}
    second_half = len(streams) - first_half

    # 3. Closed again: does the memory come back?
    for _, writer in streams:
        writer.close()
    await asyncio.sleep(args.settle + 1)
    closed = {role: proc_snapshot(pid) for role, pid in roles.items()}

    per_process = {}
    for role in roles:
        b, h, o, c = before[role], halfway[role], opened[role], closed[role]
        delta = o.get("rss_kb", 0) - b.get("rss_kb", 0)
        slope = o.get("rss_anon_kb", 0) - h.get("rss_anon_kb", 0)
        per_process[role] = {
            "rss_before_kb": b.get("rss_kb"),
            "rss_open_kb": o.get("rss_kb"),
            "rss_closed_kb": c.get("rss_kb"),
            "anon_half_kb": h.get("rss_anon_kb"),
            "anon_open_kb": o.get("rss_anon_kb"),
            "fds_before": b.get("fds"),
            "fds_open": o.get("fds"),
            "average_per_stream_kb": round(delta / len(streams), 2) if streams else None,
            "per_stream_kb": round(slope / second_half, 2) if second_half else None,
        }
    return {
        "streams_planned": args.streams,
        "sessions_created": len(sessions),
        "streams_opened": len(streams),
        "streams_first_half": first_half,
        "open_s": round(open_s, 3),
        "hold_s": args.hold,
        "errors": errors,
        "processes": per_process,
    }


def cmd_idle_streams(args: argparse.Namespace) -> None:
    # One descriptor per stream: use all the process may have.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = asyncio.run(idle_streams(args))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------
# retention


def nats_out_stream(monitor: str | None) -> dict | None:
    """The state of the JetStream stream CHATFLEET_OUT, from the server's monitoring port."""
    if not monitor:
        return None
    import urllib.request

    with urllib.request.urlopen(monitor.rstrip("/") + "/jsz?streams=true", timeout=10) as r:
        jsz = json.load(r)
    for account in jsz.get("account_details", []):
        for stream in account.get("stream_detail", []):
            if stream.get("name") == "CHATFLEET_OUT":
                state = stream.get("state", {})
                return {"messages": state.get("messages"), "bytes": state.get("bytes")}
    return None


async def read_until_done(reader: asyncio.StreamReader) -> tuple[str | None, int]:
    """Reads SSE frames until a `done` or `error` event; the first event id and the event count."""
    first, count = None, 0
    while True:
        line = (await asyncio.wait_for(reader.readline(), timeout=60)).decode().strip()
        if not line and reader.at_eof():
            return first, count
        if line.startswith("id:") and first is None:
            first = line[3:].strip()
        if line.startswith("event:"):
            count += 1
            if line[6:].strip() in ("done", "error"):
                return first, count


async def resume_timings(url: str, resumes: int) -> dict:
    """One reply in a fresh session, then `resumes` resumes from its first event id, each read
    to the reply's `done`: what one resume costs with the retention window as it is."""
    host, _, port_text = url.removeprefix("http://").rstrip("/").partition(":")
    port = int(port_text)
    status, body = await http_call(host, port, "POST", "/v1/sessions", {"Content-Type": "application/json"}, b"{}")
    if status != 201:
        raise RuntimeError(f"create session: HTTP {status}")
    session = json.loads(body)
    reader, writer = await asyncio.open_connection(host, port)
    text = json.dumps({"text": "resume me"}).encode()
    writer.write(
        (
            f"POST /v1/sessions/{session['session_id']}/messages HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {session['token']}\r\nAccept: text/event-stream\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(text)}\r\n\r\n"
        ).encode()
        + text
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    first, events = await read_until_done(reader)
    writer.close()
    took = []
    if not resumes:
        return {"events_per_reply": events, "resumes": 0, "resume_ms_p50": None, "resume_ms_max": None}
    for _ in range(resumes):
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            (
                f"GET /v1/sessions/{session['session_id']}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {session['token']}\r\nLast-Event-ID: {first}\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if int(head.split(b" ", 2)[1]) != 200:
            raise RuntimeError(f"resume: {head.splitlines()[0].decode()}")
        await read_until_done(reader)
        took.append((time.monotonic() - started) * 1000)
        writer.close()
    took.sort()
    return {"events_per_reply": events, "resumes": resumes, "resume_ms_p50": round(took[len(took) // 2], 1), "resume_ms_max": round(took[-1], 1)}


def cmd_retention(args: argparse.Namespace) -> None:
    before = json.loads(Path(args.before).read_text())
    roles = parse_roles(args.proc)
    after = {role: proc_snapshot(pid) for role, pid in roles.items()}
    result = {
        "retention_secs": args.retention_secs,
        "messages": args.messages,
        "stream": nats_out_stream(args.nats_monitor),
        "processes": {
            role: {
                "rss_before_kb": before.get(role, {}).get("rss_kb"),
                "rss_after_kb": after[role].get("rss_kb"),
            }
            for role in roles
        },
    }
    result.update(asyncio.run(resume_timings(args.url, args.resumes)))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def retention_table(results: Path) -> list[str]:
    rows = []
    for path in sorted(results.glob("*-retention-*.json")):
        r = load(path)
        if not r:
            continue
        target = path.name.split("-retention-")[0]
        stream = r.get("stream") or {}
        per_event = f"{stream['bytes'] / stream['messages']:.0f}" if stream.get("messages") else "—"
        stream_kib = f"{stream['bytes'] / 1024:.0f}" if stream.get("bytes") is not None else "—"
        resume = "—" if r["resume_ms_p50"] is None else f"{r['resume_ms_p50']} ({r['resume_ms_max']})"
        procs = ", ".join(
            f"{role} {(p.get('rss_before_kb') or 0) / 1024:.1f} → {(p.get('rss_after_kb') or 0) / 1024:.1f}"
            for role, p in r["processes"].items()
        )
        rows.append(
            f"| {target} | {r['retention_secs']} s | {r['messages']} | "
            f"{stream.get('messages', '—')} | {stream_kib} | {per_event} | "
            f"{procs} | {resume} |"
        )
    if not rows:
        return []
    return [
        "",
        "## What the retained reply events cost",
        "",
        "Reply events are kept for resuming (`Last-Event-ID`) for `--event-retention-secs`. Each row",
        "is a fresh fleet with that retention, a burst of N users (one reply each), then: the",
        "JetStream stream `CHATFLEET_OUT` as the NATS server reports it (`/jsz`; `dev` keeps the",
        "events in its own memory), the resident memory of each process before the burst and",
        "after it, and how long a resume takes from the first event of a reply to its `done` (p50",
        "and max of 20). Compare a row with the same target at 1 s: the difference is the retention's.",
        "",
        "| target | retention | replies | retained events | stream KiB | bytes per event | RSS MiB (before → after) | resume ms p50 (max) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        *rows,
    ]


# ---------------------------------------------------------------------------------------------
# report


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def fmt_ratio(value: float | None, base: float | None) -> str:
    """value / base as `1.23×`; a dash when either is missing or the base is zero."""
    if value is None or base is None or base == 0:
        return "—"
    return f"{value / base:.2f}×"


def mib(kb: int | None) -> str:
    return "—" if kb is None else f"{kb / 1024:.0f}"


def run_figures(lt: dict | None) -> dict:
    """The figures the table shows, from one loadtest JSON report."""
    if lt is None:
        return {}
    counts = lt["counts"]
    lat = lt["latency_ms"]
    # A message without a correct reply: failed, never sent, or answered in breach of isolation.
    errors = counts["failed"] + counts["not_sent"] + lt["isolation"]["violations"]
    return {
        "planned": counts["planned"],
        "answered": counts["answered"],
        "ttft_p50": lat["first_token"]["p50_ms"] if lat["first_token"]["count"] else None,
        "ttft_p99": lat["first_token"]["p99_ms"] if lat["first_token"]["count"] else None,
        "full_p99": lat["full_reply"]["p99_ms"] if lat["full_reply"]["count"] else None,
        "lag_p99": lat["start_lag"]["p99_ms"],
        "errors": errors,
        "error_kinds": lt.get("errors", {}),
        "msgs_per_s": lt["throughput"]["messages_per_s"],
        "duration_s": lt["duration_s"],
        "passed": lt["passed"],
    }


# The product's goals on this kind of machine. Burst latency: (users, target, TTFT p99 limit as a
# ratio to the same run's direct baseline). CPU: chatfleet's own CPU per answered message in a
# burst of CPU_GOAL_USERS (dev: the one process; fleet: gateway and workers together). Sustained:
# the highest arrival rate within the TTFT p99 goal, as a share of direct's. Memory: KiB per open
# idle event stream in the process that holds it.
GOALS = [
    ("1000", "dev", 1.25),
    ("5000", "dev", 1.5),
    ("10000", "dev", 2.0),
    ("1000", "fleet", 1.5),
    ("10000", "fleet", 3.0),
]
CPU_GOALS_MS = {"dev": 0.7, "fleet": 1.0}
CPU_GOAL_USERS = "1000"
SUSTAIN_GOALS = {"dev": 0.8, "fleet": 0.6}
IDLE_STREAM_GOAL_KIB = 16.0
# chatfleet's own processes (what "chatfleet ms/msg" adds up): the relay is chatfleet's code too.
CHATFLEET_ROLES = ("dev", "gateway", "worker1", "worker2", "relay")


def chatfleet_cpu_ms(results: Path, target: str, n: str, f: dict) -> float | None:
    """chatfleet's own CPU milliseconds per answered message in one burst."""
    usage = proc_usage(results, f"{target}-burst-{n}")
    own = [u["cpu_s"] for r, u in usage.items() if r in CHATFLEET_ROLES]
    if not own or not f or not f.get("answered"):
        return None
    return 1000 * sum(own) / f["answered"]


def best_sustained_rate(results: Path, target: str, rates: list[int], goal_ms: float) -> tuple[int | None, bool]:
    """The highest rate whose ramp met the goal, and whether that was the highest rate tried."""
    best = None
    for r in rates:
        f = run_figures(load(results / f"{target}-sustain-{r}.json"))
        if not f or not meets_goal(f, goal_ms):
            break
        best = r
    return best, best is not None and best == rates[-1]


def goals_table(results: Path, bursts: dict, cfg: dict) -> list[str]:
    """Each goal with this run's figure and whether it was met."""
    rows = []
    for n, t, limit in GOALS:
        f = bursts.get((t, n)) or {}
        d = bursts.get(("direct", n)) or {}
        if not f or f.get("ttft_p99") is None or not d.get("ttft_p99"):
            continue
        bound = limit * d["ttft_p99"]
        met = f["errors"] == 0 and f["answered"] == f["planned"] and f["ttft_p99"] <= bound
        rows.append(
            f"| burst TTFT p99, {t}, {n} users | ≤ {limit:g} × direct ({fmt_ms(bound)} ms) "
            f"| {fmt_ms(f['ttft_p99'])} ({fmt_ratio(f['ttft_p99'], d['ttft_p99'])}); full reply p99 "
            f"{fmt_ms(f.get('full_p99'))} ({fmt_ratio(f.get('full_p99'), d.get('full_p99'))}) "
            f"| {'met' if met else '**not met**'} |"
        )
    for t, limit in CPU_GOALS_MS.items():
        f = bursts.get((t, CPU_GOAL_USERS)) or {}
        ms = chatfleet_cpu_ms(results, t, CPU_GOAL_USERS, f)
        if ms is None:
            continue
        who = "dev" if t == "dev" else "gateway + workers"
        rows.append(
            f"| CPU per message, {t} ({who}), {CPU_GOAL_USERS} users | ≤ {limit:g} ms | {ms:.2f} ms "
            f"| {'met' if ms <= limit else '**not met**'} |"
        )
    rates = [int(r) for r in cfg.get("sustain_rates", "").split()]
    goal_ms = float(cfg.get("sustain_p99_ms", "500"))
    if rates:
        direct, direct_capped = best_sustained_rate(results, "direct", rates, goal_ms)
        for t, share in SUSTAIN_GOALS.items():
            if not (results / f"{t}-sustain-{rates[0]}.json").exists() or not direct:
                continue
            best, _ = best_sustained_rate(results, t, rates, goal_ms)
            floor = "≥ " if direct_capped else ""
            figure = "below the lowest rate tried" if best is None else f"{best}/s ({100 * best / direct:.0f}%)"
            met = best is not None and best >= share * direct
            # Where direct met the goal at the highest rate tried, its real rate is higher still: a
            # share at or above the goal is then only an upper bound.
            verdict = ("met (against direct's lower bound)" if direct_capped else "met") if met else "**not met**"
            rows.append(
                f"| sustained rate within TTFT p99 ≤ {goal_ms:.0f} ms, {t} | ≥ {100 * share:.0f}% of direct's "
                f"({floor}{direct}/s) | {figure} | {verdict} |"
            )
    for t in ("dev", "fleet"):
        idle = load(results / f"{t}-idle.json")
        role = "dev" if t == "dev" else "gateway"
        per_stream = ((idle or {}).get("processes", {}).get(role) or {}).get("per_stream_kb")
        if per_stream is None:
            continue
        rows.append(
            f"| memory per open idle event stream, {t} ({role}) | ≤ {IDLE_STREAM_GOAL_KIB:g} KiB | {per_stream:.1f} KiB "
            f"| {'met' if per_stream <= IDLE_STREAM_GOAL_KIB else '**not met**'} |"
        )
    if not rows:
        return []
    return [
        "",
        "## Goals",
        "",
        "Computed from this run. Ratios are to the direct baseline of the same run; where direct met the",
        "sustained goal at the highest rate tried, its real rate is higher and the share is an upper bound.",
        "",
        "| goal | limit | this run | |",
        "| --- | --- | --- | --- |",
        *rows,
    ]


def floor_table(results: Path, bursts: dict, cfg: dict) -> list[str]:
    """Each goal's figure for the relay beside dev's and the fleet's: what a server between user
    and model that keeps nothing achieves on this machine, the floor under chatfleet's targets."""
    if not any(t == "relay" for t, _ in bursts):
        return []
    rows = []
    for n in sorted({n for _, n in bursts}, key=int):
        d = bursts.get(("direct", n)) or {}
        cells = []
        for t in ("relay", "dev", "fleet"):
            f = bursts.get((t, n)) or {}
            cells.append(fmt_ratio(f.get("ttft_p99"), d.get("ttft_p99")) if f else "not run")
        limits = ", ".join(f"{t} ≤ {limit:g}×" for goal_n, t, limit in GOALS if goal_n == n) or "—"
        rows.append(f"| burst TTFT p99, {n} users, × direct | " + " | ".join(cells) + f" | {limits} |")
    relay_ms = chatfleet_cpu_ms(results, "relay", CPU_GOAL_USERS, bursts.get(("relay", CPU_GOAL_USERS)) or {})
    cells = []
    for t in ("relay", "dev", "fleet"):
        ms = chatfleet_cpu_ms(results, t, CPU_GOAL_USERS, bursts.get((t, CPU_GOAL_USERS)) or {})
        ratio = f" ({fmt_ratio(ms, relay_ms)} relay)" if ms is not None and relay_ms and t != "relay" else ""
        cells.append("—" if ms is None else f"{ms:.2f} ms{ratio}")
    limits = ", ".join(f"{t} ≤ {limit:g} ms" for t, limit in CPU_GOALS_MS.items())
    rows.append(f"| CPU per message, {CPU_GOAL_USERS} users (chatfleet's processes) | " + " | ".join(cells) + f" | {limits} |")
    rates = [int(r) for r in cfg.get("sustain_rates", "").split()]
    goal_ms = float(cfg.get("sustain_p99_ms", "500"))
    if rates:
        direct, capped = best_sustained_rate(results, "direct", rates, goal_ms)
        cells = []
        for t in ("relay", "dev", "fleet"):
            if not (results / f"{t}-sustain-{rates[0]}.json").exists():
                cells.append("not run")
                continue
            best, best_capped = best_sustained_rate(results, t, rates, goal_ms)
            share = f" ({100 * best / direct:.0f}%)" if best and direct else ""
            cells.append("below the lowest rate" if best is None else f"{'≥ ' if best_capped else ''}{best}/s{share}")
        limits = ", ".join(f"{t} ≥ {100 * share:.0f}%" for t, share in SUSTAIN_GOALS.items())
        direct_cell = f"{'≥ ' if capped else ''}{direct}/s" if direct else "—"
        rows.append(
            f"| sustained rate within TTFT p99 ≤ {goal_ms:.0f} ms (direct: {direct_cell}) | " + " | ".join(cells) + f" | {limits} |"
        )
    return [
        "",
        "### The floor: the same figures for a relay that keeps nothing",
        "",
        "The relay target serves each message with the least any server between user and model must do:",
        "read the request, call the model, read its stream, write each chunk to the client (chatfleet's",
        "model client and axum, no session, bus or store). Where the relay itself misses a goal, no design",
        "of that server on this stack and machine meets it.",
        "",
        "| figure | relay | dev | fleet | goal |",
        "| --- | ---: | ---: | ---: | --- |",
        *rows,
    ]


def cpu_budget(results: Path, targets: list[str], users: list[str], bursts: dict, m: dict) -> list[str]:
    """The table that shows whether a burst was bound by the machine's CPU: what every process
    (servers and load generator) used, against what the cores could give over the run."""
    try:
        cores = int(m.get("nproc", 0))
    except ValueError:
        cores = 0
    rows = []
    for n in users:
        for t in targets:
            f = bursts.get((t, n)) or {}
            usage = proc_usage(results, f"{t}-burst-{n}")
            if not f or not usage or not f.get("duration_s"):
                continue
            total = sum(u["cpu_s"] for u in usage.values())
            share = f"{100 * total / (cores * f['duration_s']):.0f}%" if cores else "?"
            answered = max(f["answered"], 1)
            fleet = sum(u["cpu_s"] for r, u in usage.items() if r in CHATFLEET_ROLES)
            brokers = sum(u["cpu_s"] for r, u in usage.items() if r in ("nats", "mongo"))
            mock = usage.get("mock", {}).get("cpu_s", 0.0)
            load_gen = usage.get("loadtest", {}).get("cpu_s", 0.0)
            rows.append(
                f"| {t} | {n} | {f['duration_s']:.1f} | {total:.1f} | {share} "
                f"| {'—' if t == 'direct' else f'{1000 * fleet / answered:.2f}'} "
                f"| {'—' if t != 'fleet' else f'{1000 * brokers / answered:.2f}'} "
                f"| {1000 * mock / answered:.2f} | {1000 * load_gen / answered:.2f} |"
            )
    if not rows:
        return []
    return [
        "",
        "## Where the time goes: CPU per burst",
        "",
        f"Every process of a run shares this machine's {cores or '?'} cores. \"CPU used\" adds up what the",
        "servers and the load generator used during the measured run; \"share\" divides it by what the",
        "cores could give over the run's duration. Per message: CPU milliseconds per answered message.",
        "",
        "| target | users | run s | CPU used s | share of the cores | chatfleet ms/msg | NATS + store server ms/msg | mock model ms/msg | load generator ms/msg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]


# The hand-written reading of the figures (what bounds them, what was done, what is next): prose
# that a run must not overwrite, so it lives in a file of its own that the report includes.
ANALYSIS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-analysis.md"


def analysis(path: Path) -> list[str]:
    """The lines of the analysis file, after a blank line; none if there is no such file."""
    if not path.exists():
        return []
    return ["", *path.read_text().rstrip("\n").split("\n")]


def meets_goal(f: dict, goal_ms: float) -> bool:
    """Whether a run answered every message correctly with TTFT p99 within the goal."""
    return bool(f) and f["errors"] == 0 and f["ttft_p99"] is not None and f["ttft_p99"] <= goal_ms


def cmd_meets_goal(args: argparse.Namespace) -> None:
    f = run_figures(load(Path(args.report)))
    sys.exit(0 if meets_goal(f, args.p99_ms) else 1)


def proc_usage(results: Path, name: str) -> dict:
    """Peak RSS and CPU seconds during the run, per role, from the before/after snapshots."""
    before = load(results / f"{name}.procs-before.json") or {}
    after = load(results / f"{name}.procs-after.json") or {}
    usage = {}
    for role, snap in after.items():
        if role.startswith("_") or not isinstance(snap, dict) or "cpu_s" not in snap:
            continue
        start = before.get(role, {})
        usage[role] = {
            "hwm_kb": snap["hwm_kb"],
            "cpu_s": snap["cpu_s"] - start.get("cpu_s", 0.0),
        }
    timing = results / f"{name}.loadtest-time"
    if timing.exists():  # /usr/bin/time -f '%e %U %S %M' of the load generator
        try:
            _, user, system, max_kb = timing.read_text().split()[-4:]
            usage["loadtest"] = {"hwm_kb": int(max_kb), "cpu_s": float(user) + float(system)}
        except ValueError:
            pass
    return usage


def latency_table(rows: list[tuple[str, str, dict, dict]]) -> list[str]:
    """rows: (target, N or label, figures, direct figures of the same load)."""
    out = [
        "| target | users | TTFT p50 ms | ×direct | TTFT p99 ms | ×direct | full reply p99 ms | ×direct "
        "| errors | ×direct | msgs/s | start lag p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target, users, f, d in rows:
        if not f:
            out.append(f"| {target} | {users} | not run | | | | | | | | | |")
            continue
        out.append(
            f"| {target} | {users} "
            f"| {fmt_ms(f['ttft_p50'])} | {fmt_ratio(f['ttft_p50'], d.get('ttft_p50'))} "
            f"| {fmt_ms(f['ttft_p99'])} | {fmt_ratio(f['ttft_p99'], d.get('ttft_p99'))} "
            f"| {fmt_ms(f['full_p99'])} | {fmt_ratio(f['full_p99'], d.get('full_p99'))} "
            f"| {f['errors']} | {fmt_ratio(f['errors'], d.get('errors'))} "
            f"| {f['msgs_per_s']:.0f} | {fmt_ms(f['lag_p99'])} |"
        )
    return out


def resource_row(target: str, users: str, usage: dict) -> str:
    def cell(role: str) -> str:
        u = usage.get(role)
        return "—" if u is None else f"{mib(u['hwm_kb'])} / {u['cpu_s']:.2f}"

    front = {"dev": "dev", "relay": "relay"}.get(target, "gateway")
    workers = " + ".join(cell(r) for r in ("worker1", "worker2") if r in usage) or "—"
    others = ", ".join(f"{r} {usage[r]['cpu_s']:.2f}" for r in ("nats", "mongo", "mock") if r in usage)
    return f"| {target} | {users} | {cell(front)} | {workers} | {others or '—'} | {cell('loadtest')} |"


def headline(cfg: dict, m: dict) -> str:
    """The report's top line: are these the reference figures, and was the machine quiet?"""
    if cfg.get("label", "").strip():
        return cfg["label"].strip()
    # Judged before the suite's own release build when it made one (its load would still show at
    # the start of the first run), else at the start.
    when, loadavg = "before the build", cfg.get("loadavg_before_build", "")
    if not loadavg.strip() or cfg.get("build") == "0":
        when, loadavg = "at the start", m.get("loadavg_at_start", "")
    try:
        load1, cores = float(loadavg.split()[0]), int(m["nproc"])
    except (KeyError, ValueError, IndexError):
        load1, cores = 0.0, 1
    # Other work using half the cores or more skews every figure; say so.
    busy = load1 >= 0.5 * cores
    machine = f" on a shared machine (load average {load1:.1f} on {cores} cores {when})" if busy else ""
    if cfg.get("reference") == "1":
        if not busy:
            return "Reference figures (the default loads of scripts/bench.sh)."
        return f"Default loads{machine}: skewed figures; run scripts/bench.sh on a quiet machine for the reference ones."
    users = " and ".join(cfg.get("users", "").split())
    return (
        f"Smoke run ({users} users; ramp {cfg.get('ramp_rate')}/s for {cfg.get('ramp_secs')} s){machine} — "
        "not the reference figures; run scripts/bench.sh on a quiet machine for those."
    )


def cmd_report(args: argparse.Namespace) -> None:
    results = Path(args.results)
    meta = load(results / "meta.json") or {}
    m = meta.get("machine", {})
    cfg = meta.get("config", {})
    users = cfg.get("users", "").split()
    targets = [t for t in TARGETS if t in cfg.get("targets", " ".join(TARGETS)).split()]

    md: list[str] = ["# chatfleet benchmarks", ""]
    md += [f"> **{headline(cfg, m)}**", ""]
    this_run = "scripts/bench.sh"
    if cfg.get("reference") != "1":
        this_run = (
            f"BENCH_USERS=\"{cfg.get('users', '')}\" BENCH_RAMP_RATE={cfg.get('ramp_rate')} "
            f"BENCH_RAMP_SECS={cfg.get('ramp_secs')} scripts/bench.sh"
        )
    md += [
        "Reproduce with one command from the repository root:",
        "",
        "```sh",
        "scripts/bench.sh        # BENCH_USERS=\"100 1000\" BENCH_RAMP_RATE=200 BENCH_RAMP_SECS=20 to change the load",
        "```",
        "",
        f"This file came from `{this_run}`.",
        "",
        "It builds the release binaries, then for each load starts fresh servers for each target, runs",
        "`chatfleet-loadtest` against them, and rewrites this file. Raw results (loadtest `--json` reports,",
        f"`--svg` charts, server logs) are in `{cfg.get('results_dir', results)}`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m.get('cpu_model', '?')}, {m.get('nproc', '?')} cores (`nproc`)",
        f"- memory: {m.get('mem_total', '?')} (MemTotal)",
        f"- kernel: {m.get('kernel', '?')}",
        f"- date: {m.get('date', '?')}; load average at start: {m.get('loadavg_at_start', '?')}"
        + (f" (before the release build: {cfg['loadavg_before_build']})" if cfg.get("build") == "1" else ""),
        f"- commit: {cfg.get('commit', '?')}",
        f"- NATS: {cfg.get('nats_version', '?')}; MongoDB-wire server: {cfg.get('mongo_server', '?')}",
        "",
        "## Setup",
        "",
        f"- Model: `chatfleet mock-llm {cfg.get('mock_args', '')}` for every target, so the model is identical:",
        "  the direct baseline is the least any target can take.",
        "- **direct**: `chatfleet-loadtest --target openai` straight at the mock (the baseline).",
        "- **relay**: `chatfleet mock-llm --upstream` in front of the mock, and `--target openai` at it: each",
        "  request is relayed through chatfleet's model client and its chunks written back as they come,",
        "  with nothing kept (no session, bus or store). The floor of any server between user and model",
        "  on this stack; what `dev` and the fleet cost beyond it is their sessions, bus and store.",
        "- **dev**: `chatfleet dev` (in-process bus, embedded store in a temp dir, its default single worker)",
        "  with `--llm-base-url` at the mock.",
        "- **fleet**: `chatfleet gateway` + 2 `chatfleet worker` processes on NATS JetStream and the MongoDB-wire",
        "  server named above; the burst starts once the 2 workers own all partitions evenly.",
        *(
            [
                "- secantusd-py is a Python MongoDB-wire *test* server, not a production MongoDB: its CPU time is",
                "  under \"others\" below; where it is high, it may be what the fleet's figures measure.",
            ]
            if "secantusd-py" in cfg.get("mongo_server", "")
            else [
                "- secantusd-rs is a MongoDB-wire *test* server (SecantusDB's Rust build, on WiredTiger), run",
                "  here in place of a MongoDB; its CPU time is under \"others\" below.",
            ]
        ),
        "- Every target keeps its default settings (e.g. `--max-inflight 4096` per worker, `--delta-batch-ms 100`, 16 partitions).",
        "  Each run gets freshly started servers and a warm-up of "
        f"{cfg.get('warmup', '?')} users before it is measured.",
        "- The load generator runs on the same machine as the servers and competes with them for CPU.",
        f"- Loadtest timeout per reply: {cfg.get('timeout', '?')} s. Latencies count from when each message",
        "  was due (see loadtest/README.md); on dev and fleet they include creating the session.",
        "",
        "## Burst: N users, one message each, all at once",
        "",
        "TTFT = time to first token. ×direct = the figure divided by the direct baseline's for the same",
        "load in this run (— when the baseline is 0 or missing). errors = messages without a correct",
        "reply (failed, not sent, or isolation violations).",
        "",
    ]
    bursts = {(t, n): run_figures(load(results / f"{t}-burst-{n}.json")) for t in targets for n in users}
    rows = [(t, n, bursts[(t, n)], bursts.get(("direct", n), {})) for n in users for t in targets]
    md += latency_table(rows)

    rate, secs = cfg.get("ramp_rate", "?"), cfg.get("ramp_secs", "?")
    md += ["", f"## Ramp: {rate} new users/s for {secs} s (open loop)", ""]
    ramps = {t: run_figures(load(results / f"{t}-ramp.json")) for t in targets}
    ramp_users = next((str(f["planned"]) for f in ramps.values() if f), "?")
    md += latency_table([(t, ramp_users, ramps[t], ramps.get("direct", {})) for t in targets])

    md += [
        "",
        "## Server resources per run",
        "",
        "Each cell: peak resident memory in MiB / CPU seconds used during the measured run (after",
        "start-up and warm-up). Peak RSS is VmHWM, reset just before the run. Other processes: CPU seconds.",
        "",
        "| target | users | gateway, dev or relay | worker 1 + worker 2 | others (CPU s) | load generator |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for n in users:
        for t in targets:
            md.append(resource_row(t, n, proc_usage(results, f"{t}-burst-{n}")))
    for t in targets:
        md.append(resource_row(t, f"ramp {ramp_users}", proc_usage(results, f"{t}-ramp")))

    idle_rows = []
    for t in ("dev", "fleet"):
        idle = load(results / f"{t}-idle.json")
        if not idle:
            continue
        for role, p in idle["processes"].items():
            per_stream, average = p.get("per_stream_kb"), p.get("average_per_stream_kb")
            idle_rows.append(
                f"| {t} ({role}) | {idle['streams_opened']} of {idle['streams_planned']} "
                f"| {mib(p.get('rss_before_kb'))} | {mib(p.get('rss_open_kb'))} | {mib(p.get('rss_closed_kb'))} "
                f"| {'—' if average is None else f'{average:.1f}'} "
                f"| {'—' if per_stream is None else f'{per_stream:.1f}'} "
                f"| {p.get('fds_before')} → {p.get('fds_open')} |"
            )
    if idle_rows:
        md += [
            "",
            "## Memory per open idle event stream",
            "",
            "K sessions are created, then K `GET /v1/sessions/{id}/events` streams opened and held idle,",
            "half of them first and then the rest; the resident memory (VmRSS) of the process holding them",
            "is read before, with them open, and after closing them. Average = (open − before) / streams",
            "opened. KiB per stream = what the second half added to the anonymous memory (RssAnon: heap",
            "and stacks) / its streams: the cost of one more stream, without what any load makes a",
            "process keep (allocator arenas, runtime buffers), which the first half pays.",
            "",
            "| target (process) | streams | RSS before MiB | RSS open MiB | RSS after close MiB | average KiB | KiB per stream | descriptors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *idle_rows,
        ]

    md += retention_table(results)
    md += goals_table(results, bursts, cfg)
    md += floor_table(results, bursts, cfg)
    md += cpu_budget(results, targets, users, bursts, m)
    md += profile_table(results, cfg)
    md += loadtest_profile_table(results, cfg)
    md += analysis(Path(args.analysis))

    sustain_rates = [int(r) for r in cfg.get("sustain_rates", "").split()]
    if sustain_rates:
        goal = float(cfg.get("sustain_p99_ms", "500"))
        secs = cfg.get("sustain_secs", "?")
        md += [
            "",
            f"## Sustained load: the highest arrival rate that keeps TTFT p99 ≤ {goal:.0f} ms",
            "",
            f"Open-loop ramps of {secs} s at rising rates (new users per second, one message each), each on",
            "freshly started servers; a target's search stops at the first rate that misses the goal",
            "(\"not run\" above it).",
            "",
            "| target | highest rate meeting the goal | " + " | ".join(f"{r}/s: TTFT p99 ms" for r in sustain_rates) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in sustain_rates) + " |",
        ]
        for t in targets:
            best, cells = None, []
            for r in sustain_rates:
                f = run_figures(load(results / f"{t}-sustain-{r}.json"))
                if not f:
                    cells.append("not run")
                    continue
                ok = meets_goal(f, goal)
                if ok:
                    best = r
                errors = f" ({f['errors']} errors)" if f["errors"] else ""
                cells.append(f"{fmt_ms(f['ttft_p99'])}{errors}{'' if ok else ' ✗'}")
            if best is None:
                best_cell = f"below {sustain_rates[0]}/s"
            elif best == sustain_rates[-1]:
                best_cell = f"≥ {best}/s (the highest tried)"
            else:
                best_cell = f"{best}/s"
            md.append(f"| {t} | {best_cell} | " + " | ".join(cells) + " |")

    webhook_loads = cfg.get("webhooks", "").split()
    webhook_rows = []
    for n in webhook_loads:
        for t in targets:
            w = load(results / f"{t}-webhooks-{n}.json")
            if not w:
                continue
            c, d = w.get("counts", {}), w.get("delivery_latency", {})
            webhook_rows.append(
                f"| {t} | {n} | {c.get('delivered')} | {c.get('missing')} | {c.get('duplicates')} "
                f"| {c.get('bad_signatures')} | {fmt_ms(d.get('p50_ms'))} | {fmt_ms(d.get('p90_ms'))} "
                f"| {fmt_ms(d.get('p99_ms'))} | {fmt_ms(d.get('max_ms'))} | {w.get('deliveries_per_s', 0):.1f} |"
            )
    if webhook_rows:
        md += [
            "",
            "## Signed webhooks: N conversations to their signed deliveries",
            "",
            "`chatfleet-loadtest webhooks --conversations N`: N webhook conversations at once (one message each,",
            "signed by Standard Webhooks), each reply delivered by the gateway to a receiver the load generator",
            "runs, which verifies its signature. Latency is from sending a message to receiving its signed reply;",
            "duplicates are deliveries repeating a `webhook-id`. On freshly started servers, like the runs above.",
            "",
            "| target | conversations | delivered | missing | duplicates | badly signed | p50 ms | p90 ms | p99 ms | max ms | deliveries/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *webhook_rows,
        ]

    problems = []
    for (t, n), f in bursts.items():
        if f and f["error_kinds"]:
            problems.append(f"- {t}, burst {n}: " + ", ".join(f"{k} ×{v}" for k, v in f["error_kinds"].items()))
    for t, f in ramps.items():
        if f and f["error_kinds"]:
            problems.append(f"- {t}, ramp: " + ", ".join(f"{k} ×{v}" for k, v in f["error_kinds"].items()))
    if problems:
        md += ["", "## Errors by kind", "", *problems]
    md.append("")

    text = "\n".join(md)
    Path(args.out).write_text(text)
    print(text)


# ---------------------------------------------------------------------------------------------
# profiles: perf samples of a burst, folded into one stack per line, sorted into a message's steps


def cmd_fold_roles(args: argparse.Namespace) -> None:
    """Renames the process at the root of each folded stack (`comm-PID`, from inferno-collapse-perf
    --pid) to its role, so that a flame graph reads `worker1`, not a thread name and a number.
    A lone ROLE (no `=PID`) names every stack: a recording of one process and its threads."""
    only = next((item for item in args.roles if "=" not in item), None)
    roles = {} if only else {str(pid): role for role, pid in parse_roles(args.roles).items()}
    for line in Path(args.folded).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        root, sep, rest = stack.partition(";")
        pid = root.rpartition("-")[2]
        print(f"{only or roles.get(pid, root)}{sep}{rest} {count}")


# The steps of a message, each with the frames that mark it: regular expressions searched in
# each frame as perf names it (a Rust path; an inlined frame's name also carries its generic
# arguments). A sample belongs to the step of the deepest marked frame of its stack, so a store
# write inside the worker's answer counts as the commit and the worker's own code around it as
# the worker's logic. Frames no rule marks (std, tokio, hyper's shared code, the allocator, the
# kernel) count for the step they run in; a stack with no marked frame at all is the runtime's.
STEPS: list[tuple[str, str]] = [
    (
        "HTTP serving: read requests, route them, write answers and stream bytes",
        r"chatfleet_gateway::server::|hyper_util::server::|hyper::server::|axum::routing|matchit::|axum::serve"
        r"|chatfleet_gateway::(extract|auth|body|error|quotas|session_cache|health)"
        r"|chatfleet_gateway::routes::(?!messages::reply_stream)",
    ),
    ("publish the message to the bus", r"as chatfleet_bus::Bus>::enqueue|chatfleet_bus::\w+::\w*enqueue"),
    (
        "consume it and hand it to a generation",
        r"chatfleet_bus::(memory|nats|amqp)::consume|chatfleet_worker::(partition|session::|job|lib)",
    ),
    (
        "read the session and the context",
        r"as chatfleet_store::Store>::(session|message_and_reply|recent|outcome|message)\b|chatfleet_worker::(context|cache)",
    ),
    (
        "call the model and read its stream",
        r"chatfleet_llm::(?!relay::|mock_server::)|async_openai::|reqwest::|eventsource_stream::|hyper_util::client::|hyper::client::",
    ),
    (
        "encode, publish, route and send each reply event",
        r"chatfleet_worker::events|chatfleet_gateway::sse|chatfleet_gateway::routes::messages::reply_stream"
        r"|as chatfleet_bus::Bus>::(publish_event|subscribe_events|resume_events)|chatfleet_bus::(memory::retention|nats::replies|amqp::(replies|events))"
        r"|axum::response::sse|ReplyEvent|chatfleet_llm::(relay|mock_server)::",
    ),
    (
        "commit: the store's writes",
        r"as chatfleet_store::Store>::(insert_message|mark_failed|end_reply|begin_reply|begin_generation|create_session|add_to_counter|\w*insert\w*|\w*record\w*)"
        r"|chatfleet_store::embedded::(commit_batch|spawn_writer)|redb::",
    ),
    ("bus client I/O (NATS, AMQP connections)", r"^async_nats::|^<async_nats::|^lapin::|^<lapin::|amq_protocol"),
    # The MongoDB driver runs each operation in a task of its own, so on the fleet most of the
    # store's reads and writes show here rather than under the steps above.
    ("the MongoDB driver (reads and writes, in its own tasks)", r"mongodb::|bson::"),
    (
        "logs, traces and metrics",
        r"tracing_subscriber::|tracing_core::|tracing::span::|tracing_opentelemetry|opentelemetry|chatfleet_\w+::telemetry|metrics_exporter|metrics::",
    ),
    (
        "the worker's own logic (retries, settling, channels)",
        r"chatfleet_worker::(process|settle|retry|channel)",
    ),
]
RUNTIME_STEP = "runtime and the rest: scheduling, timers, wake-ups, no step's frame"
ALLOCATOR = r"^(malloc|free|realloc|calloc|cfree|_int_malloc|_int_free|_int_realloc|malloc_consolidate|unlink_chunk|tcache_get|tcache_put|__GI___libc_malloc|__GI___libc_free|__GI___libc_realloc|__libc_malloc|__libc_free)$"


def classify(frames: list[str], rules: list[tuple[str, re.Pattern]], unmarked: str = RUNTIME_STEP) -> str:
    """The step of the deepest marked frame (see STEPS), else `unmarked`."""
    for frame in reversed(frames):
        for step, rule in rules:
            if rule.search(frame):
                return step
    return unmarked



def budget(folded: Path) -> dict:
    """Samples per role and step of one profiled burst (see STEPS; LOADTEST_STEPS for the load
    generator), with the samples in the allocator and in the kernel counted apart."""
    server_rules = [(step, re.compile(pattern)) for step, pattern in STEPS]
    loadtest_rules = [(step, re.compile(pattern)) for step, pattern in LOADTEST_STEPS]
    allocator = re.compile(ALLOCATOR)
    roles: dict[str, dict] = {}
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = stack.split(";")
        role = roles.setdefault(frames[0], {"samples": 0, "steps": {}, "allocator": 0, "kernel": 0, "unmarked": {}})
        if frames[0] == "loadtest":
            step = classify(frames[1:], loadtest_rules, LOADTEST_RUNTIME_STEP)
        else:
            step = classify(frames[1:], server_rules)
        role["samples"] += count
        role["steps"][step] = role["steps"].get(step, 0) + count
        if any(allocator.search(f) for f in frames[-3:]):
            role["allocator"] += count
        if frames[-1].endswith("_[k]"):
            role["kernel"] += count
        if step in (RUNTIME_STEP, LOADTEST_RUNTIME_STEP):
            # The innermost frame of our own or a library's code in a stack no rule marked: what
            # a new rule would have to name.
            key = next((f for f in reversed(frames) if not f.startswith(SKIPPED_FRAMES)), frames[-1])
            role["unmarked"][key] = role["unmarked"].get(key, 0) + count
    for role in roles.values():
        role["unmarked"] = dict(sorted(role["unmarked"].items(), key=lambda kv: -kv[1])[:15])
    return roles


# The load generator's own work per message, sorted the same way (deepest marked frame).
LOADTEST_STEPS: list[tuple[str, str]] = [
    ("parse each event: SSE framing and the event's JSON", r"eventsource_stream::|nom::|serde_json::|chatfleet_loadtest::client::parse_event"),
    ("record the figures: token clock, histograms, checks", r"chatfleet_loadtest::(report|isolation)|TokenClock|chatfleet_loadtest::runner::Collector|hdrhistogram::"),
    (
        "HTTP client: connect, send each request, read the body (socket reads are here)",
        r"reqwest::|hyper::|hyper_util::|http_body|hyper_rustls::|tokio::net::tcp",
    ),
    ("schedule users and run their turns", r"chatfleet_loadtest::"),
]
LOADTEST_RUNTIME_STEP = "runtime and the rest: scheduling, timers, wake-ups, epoll, no step's frame"

SKIPPED_FRAMES = ("tokio::", "<tokio", "std::", "<std", "core::", "<core", "[", "__", "syscall", "entry_SYSCALL", "do_syscall")


def cmd_budget(args: argparse.Namespace) -> None:
    print(json.dumps(budget(Path(args.folded)), indent=1))


def profile_usage(results: Path, target: str, n: str) -> tuple[dict, int]:
    """The CPU per role and the answered messages that a profiled burst's samples are scaled
    by: those of the unprofiled burst of the same size, or, without one, of the profiled burst
    itself (which perf slows down)."""
    source = f"{target}-burst-{n}"
    lt = run_figures(load(results / f"{source}.json"))
    usage = proc_usage(results, source) if lt else {}
    if not usage:
        source = f"{target}-profile-{n}"
        lt = run_figures(load(results / f"{source}.json"))
        usage = proc_usage(results, source)
    return usage, max((lt or {}).get("answered", 0), 1)


def role_cost(s: dict | None, u: dict | None, answered: int) -> tuple[dict, float, float] | None:
    """One role's samples (from `budget`) turned into microseconds per answered message, with its
    CPU (from `proc_usage`): per step, in the allocator, in the kernel. None without samples."""
    if not s or not u or not s["samples"]:
        return None
    us_per_sample = 1e6 * u["cpu_s"] / answered / s["samples"]
    per_step = {step: count * us_per_sample for step, count in s["steps"].items()}
    return per_step, s["allocator"] * us_per_sample, s["kernel"] * us_per_sample


def loadtest_profile_table(results: Path, cfg: dict) -> list[str]:
    """The load generator's CPU per message, by what it spends it on, in each target's profiled
    burst: it shares the cores with the servers, so what it costs lengthens every target's tail."""
    n = cfg.get("profile_users", "0")
    columns = []  # (title, µs per step, allocator µs, kernel µs)
    for target in TARGETS:
        folded = results / f"{target}-profile-{n}.folded"
        if not folded.exists():
            continue
        usage, answered = profile_usage(results, target, n)
        cost = role_cost(budget(folded).get("loadtest"), usage.get("loadtest"), answered)
        if cost:
            columns.append((f"against {target}", *cost))
    if not columns:
        return []
    md = [
        "",
        f"### The load generator's CPU per message, in the same bursts of {n} users",
        "",
        "`chatfleet-loadtest` ran under a `perf record` of its own in each profiled burst; its samples are",
        "sorted the same way (`LOADTEST_STEPS` in scripts/bench_table.py) and scaled by its CPU per answered",
        "message in the unprofiled burst (`/usr/bin/time`). Flame graphs: "
        + ", ".join(f"`{cfg.get('perf_dir', 'docs/perf')}/loadtest-{t.removeprefix('against ')}-burst-{n}.svg`" for t, *_ in columns)
        + ".",
        "",
    ]
    steps = [step for step, _ in LOADTEST_STEPS] + [LOADTEST_RUNTIME_STEP]
    return md + budget_rows(steps, columns)


def profile_table(results: Path, cfg: dict) -> list[str]:
    """The CPU budget per step of a message, from the profiled bursts: each role's share of
    samples per step, times that role's CPU per answered message in the unprofiled burst of the
    same size (or, without one, in the profiled burst itself, which perf slows down)."""
    n = cfg.get("profile_users", "0")
    columns = []  # (title, target, roles)
    for target, title, role_sets in (
        ("relay", "relay", [("relay", ["relay"])]),
        ("dev", "dev", [("dev", ["dev"])]),
        ("fleet", "fleet", [("gateway", ["gateway"]), ("workers", ["worker1", "worker2"])]),
    ):
        folded = results / f"{target}-profile-{n}.folded"
        if not folded.exists():
            continue
        samples = budget(folded)
        usage, answered = profile_usage(results, target, n)
        for label, roles in role_sets:
            us_per_step: dict[str, float] = {}
            alloc_us = kernel_us = 0.0
            for role in roles:
                cost = role_cost(samples.get(role), usage.get(role), answered)
                if not cost:
                    continue
                for step, us in cost[0].items():
                    us_per_step[step] = us_per_step.get(step, 0.0) + us
                alloc_us += cost[1]
                kernel_us += cost[2]
            if us_per_step:
                title_of_column = f"{title}: {label}" if target == "fleet" else title
                columns.append((title_of_column, us_per_step, alloc_us, kernel_us))
    if not columns:
        return []
    steps = [step for step, _ in STEPS] + [RUNTIME_STEP]
    md = [
        "",
        f"## CPU budget per message: a burst of {n} users under perf",
        "",
        f"Each chatfleet process was sampled by `perf record` at {cfg.get('profile_hz', '?')} Hz with DWARF call",
        "stacks during a burst of its own (fresh servers, after the warm-up). A sample counts for the step of",
        "the deepest frame that marks one (`STEPS` in scripts/bench_table.py); its share of the process's",
        "samples times the process's CPU per answered message in the unprofiled burst of the same size gives",
        "the microseconds below. The flame graphs are in "
        f"`{cfg.get('perf_dir', 'docs/perf')}/` ({', '.join(f'`{t}-burst-{n}.svg`' for t in ('relay', 'dev', 'fleet') if (results / f'{t}-profile-{n}.folded').exists())}).",
        "",
    ]
    return md + budget_rows(steps, columns)


def budget_rows(steps: list[str], columns: list[tuple[str, dict, float, float]]) -> list[str]:
    """A budget table: a row per step with each column's microseconds and share, then the totals.
    Each column is (title, µs per step, allocator µs, kernel µs)."""
    md = [
        "| step | " + " | ".join(title for title, *_ in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    totals = [sum(per_step.values()) or 1.0 for _, per_step, _, _ in columns]
    for step in steps:
        cells = []
        for (_, per_step, _, _), total in zip(columns, totals):
            us = per_step.get(step, 0.0)
            cells.append(f"{us:.0f} µs ({100 * us / total:.0f}%)")
        md.append(f"| {step} | " + " | ".join(cells) + " |")
    md.append("| **CPU per message** | " + " | ".join(f"**{sum(c[1].values()):.0f} µs**" for c in columns) + " |")
    md.append("| of which in the kernel (system calls, network stack, scheduling) | " + " | ".join(f"{c[3]:.0f} µs" for c in columns) + " |")
    md.append("| of which in the allocator (malloc, free) | " + " | ".join(f"{c[2]:.0f} µs" for c in columns) + " |")
    return md


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("meta")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    p = sub.add_parser("procs")
    p.add_argument("--reset-peak", action="store_true")
    p.add_argument("roles", nargs="*", metavar="ROLE=PID")
    p = sub.add_parser("balanced")
    p.add_argument("workers", type=int)
    p = sub.add_parser("idle-streams")
    p.add_argument("--url", required=True)
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--proc", action="append", default=[], metavar="ROLE=PID")
    p.add_argument("--hold", type=float, default=3.0, help="seconds the streams stay open before measuring")
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--out", required=True)
    p = sub.add_parser("retention")
    p.add_argument("--url", required=True)
    p.add_argument("--proc", action="append", default=[], metavar="ROLE=PID")
    p.add_argument("--before", required=True, help="a `procs` snapshot taken before the burst")
    p.add_argument("--nats-monitor", help="the NATS server's monitoring URL")
    p.add_argument("--retention-secs", type=int, required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--resumes", type=int, default=20)
    p.add_argument("--out", required=True)
    p = sub.add_parser("meets-goal", help="exit 0 if a loadtest report met the TTFT p99 goal with no errors")
    p.add_argument("report")
    p.add_argument("p99_ms", type=float)
    p = sub.add_parser("fold-roles")
    p.add_argument("folded")
    p.add_argument("roles", nargs="*", metavar="ROLE=PID")
    p = sub.add_parser("budget")
    p.add_argument("folded")
    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("--out", required=True)
    p.add_argument("--analysis", default=str(ANALYSIS), help="hand-written prose pasted in after the tables")
    args = parser.parse_args()

    if args.command == "meta":
        config = dict(item.partition("=")[::2] for item in args.settings)
        print(json.dumps({"machine": machine(), "config": config}, indent=1))
    elif args.command == "procs":
        cmd_procs(args)
    elif args.command == "balanced":
        cmd_balanced(args)
    elif args.command == "idle-streams":
        cmd_idle_streams(args)
    elif args.command == "retention":
        cmd_retention(args)
    elif args.command == "meets-goal":
        cmd_meets_goal(args)
    elif args.command == "fold-roles":
        cmd_fold_roles(args)
    elif args.command == "budget":
        cmd_budget(args)
    elif args.command == "report":
        cmd_report(args)


if __name__ == "__main__":
    main()
