#!/usr/bin/env python3
"""Drives a running `ferry send` or `ferry receive` over its QMP socket with
QEMU's own client library, `qemu.qmp`, as a management layer would, for
tests/tests/qmp.rs.

It polls query-migrate, records every event, changes parameters at set times
and, at a chosen point of the migration, cancels it (migrate_cancel) or sends
SIGTERM to a process. When the migration ends (or the server goes away) it
prints one JSON object: {"polls": [...], "events": [...], "sets": [...],
"acted": {...} or null}.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from qemu.qmp import QMPClient

FINAL = ("completed", "failed", "cancelled")


def reached(point, info):
    """Whether the migration described by query-migrate's `info` is at `point`."""
    status = info["status"]
    ram = info.get("ram", {})
    passes = ram.get("dirty-sync-count", 0)
    if point == "setup":
        return status == "setup"
    if point == "bulk":
        return status == "active" and passes == 1 and ram.get("transferred", 0) >= 4 << 20
    if point == "late":
        return status == "active" and passes >= 3
    if point == "device":
        return status == "device"
    if point == "active":
        return status == "active" and ram.get("transferred", 0) > 0
    raise ValueError(point)


async def connect(path, timeout):
    deadline = time.monotonic() + timeout
    while True:
        q = QMPClient("ferry-test")
        try:
            await q.connect(path)
            return q
        except Exception:  # not listening yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sock")
    ap.add_argument("--at", choices=["setup", "bulk", "late", "device", "active"])
    ap.add_argument("--do", choices=["cancel", "sigterm"], default="cancel")
    ap.add_argument("--pid", type=int, help="the process --do sigterm signals")
    ap.add_argument("--set", action="append", default=[],
                    help="SECONDS=JSON: migrate-set-parameters that long after 'active'")
    ap.add_argument("--poll", type=float, default=0.05)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()

    q = await connect(args.sock, 30)
    t0 = time.monotonic()
    out = {"polls": [], "events": [], "sets": [], "acted": None}

    async def listen():
        async for ev in q.events:
            out["events"].append({
                "event": ev["event"],
                "data": ev.get("data"),
                "timestamp": ev["timestamp"],
                "t": time.monotonic() - t0,
            })

    task = asyncio.create_task(listen())
    sets = []
    for s in args.set:
        secs, arguments = s.split("=", 1)
        sets.append((float(secs), json.loads(arguments)))
    active_since = None
    while time.monotonic() - t0 < args.timeout:
        try:
            info = await q.execute("query-migrate")
        except Exception:  # the process exited and closed the socket
            break
        t = time.monotonic() - t0
        ram = info.get("ram", {})
        out["polls"].append({
            "t": t,
            "status": info["status"],
            "transferred": ram.get("transferred"),
            "pass": ram.get("dirty-sync-count"),
            "remaining": ram.get("remaining"),
            "dirty-pages-rate": ram.get("dirty-pages-rate"),
            "compressed-pages": info.get("compression", {}).get("pages"),
            "compressed-size": info.get("compression", {}).get("compressed-size"),
        })
        if info["status"] in FINAL:
            break
        if info["status"] != "setup" and active_since is None:
            active_since = t
        while active_since is not None and sets and t - active_since >= sets[0][0]:
            _, arguments = sets.pop(0)
            await q.execute("migrate-set-parameters", arguments)
            out["sets"].append({"t": time.monotonic() - t0, "arguments": arguments})
        if args.at and out["acted"] is None and reached(args.at, info):
            out["acted"] = {"t": t, "info": info,
                            "run-state": await q.execute("query-status")}
            if args.do == "cancel":
                await q.execute("migrate_cancel")
            else:
                os.kill(args.pid, signal.SIGTERM)
        await asyncio.sleep(args.poll)
    # The last events (cancelled, completed) come just before the socket closes.
    await asyncio.sleep(0.3)
    task.cancel()
    try:
        await q.disconnect()
    except Exception:  # the server went first
        pass
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
