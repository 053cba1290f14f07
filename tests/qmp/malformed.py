#!/usr/bin/env python3
"""Sends malformed QMP requests to a running ferry over a raw socket (no
client library would send them) and prints each answer as JSON, one object:
{"answers": [[name, answer], ...]}. The server must answer every one with a
QMP error and keep serving: the last request is a valid query-migrate.
"""

import json
import socket
import sys
import time


def main():
    path = sys.argv[1]
    deadline = time.monotonic() + 30
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    f = s.makefile("rwb")

    def answer():
        while True:
            line = f.readline()
            if not line:
                raise EOFError("the server closed the connection")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    greeting = json.loads(f.readline())
    out = {"greeting": greeting, "answers": []}
    requests = [
        ("before negotiation", b'{"execute": "query-migrate"}\n'),
        ("negotiation", b'{"execute": "qmp_capabilities"}\n'),
        ("bad json", b'{"execute": }\n'),
        ("not an object", b'[1, 2]\n'),
        ("unknown command", b'{"execute": "no-such-command", "id": 1}\n'),
        ("wrong argument type", b'{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": "fast"}, "id": 2}\n'),
        ("unknown argument", b'{"execute": "migrate-set-parameters", "arguments": {"no-such": 1}, "id": 3}\n'),
        ("10 MB line", b'{"execute": "query-migrate", "id": "' + b"x" * (10 << 20) + b'"}\n'),
        ("valid after all that", b'{"execute": "query-migrate", "id": 4}\n'),
    ]
    for name, req in requests:
        f.write(req)
        f.flush()
        out["answers"].append([name, answer()])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
