#!/usr/bin/env python3
"""JSON on stdin to TOML on stdout: enough for the daemons' settings (tables, strings, numbers,
booleans, arrays of those), as nixpkgs' pkgs.formats.toml writes them. Checks its own output by
reading it back with tomllib."""

import json
import sys
import tomllib


def scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string
    if isinstance(v, list):
        return "[" + ", ".join(scalar(x) for x in v) + "]"
    raise SystemExit(f"json-to-toml: cannot write {v!r}")


def table(d, path, out):
    plain = {k: v for k, v in d.items() if not isinstance(v, dict)}
    if path and plain:
        out.append("[" + ".".join(json.dumps(p) for p in path) + "]")
    for k, v in plain.items():
        out.append(f"{json.dumps(k)} = {scalar(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            table(v, path + [k], out)


data = json.load(sys.stdin)
lines = []
table(data, [], lines)
text = "\n".join(lines) + "\n"
if tomllib.loads(text) != data:
    raise SystemExit("json-to-toml: the TOML does not read back as the JSON")
sys.stdout.write(text)
