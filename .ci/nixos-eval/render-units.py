#!/usr/bin/env python3
"""Renders units from an eval.sh report (JSON on stdin) the way NixOS writes them, into ROOT.

    render-units.py ROOT BASE_DIR UNIT...

A unit whose file BASE_DIR ships (the package's systemd/ units, with /usr/local/bin/ replaced by
the package's store path as the package build does) is written as that file plus the module's
settings as a drop-in, overrides.conf, which is what NixOS does for units from systemd.packages.
Other units are written whole. Each executable a unit names gets a stand-in under ROOT, so that
`systemd-analyze verify --root=ROOT` can resolve it. Prints the paths of the units written.
"""

import json
import os
import re
import sys


def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def section(name, attrs):
    lines = [f"[{name}]"]
    for key, v in attrs.items():
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"{key}={value(item)}")
    return lines


def stand_in(root, command):
    exe = re.match(r'^"?([^" ]+)', command)
    if exe and exe.group(1).startswith("/"):
        path = root + exe.group(1)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, 0o755)


def render(root, base_dir, kind, name, unit):
    unit_dir = f"{root}/etc/systemd/system"
    os.makedirs(unit_dir, exist_ok=True)
    file_name = f"{name}.{kind}"
    lines = section("Unit", unit.get("unitConfig", {}))
    if kind == "service":
        service = dict(unit.get("serviceConfig", {}))
        env = unit.get("environment", {})
        if env:
            service["Environment"] = [f'"{k}={v}"' for k, v in env.items()]
        lines += [""] + section("Service", service)
        for key in ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecStop"):
            for command in service.get(key, []) if isinstance(service.get(key), list) else [service.get(key, "")]:
                if command:
                    stand_in(root, command)
    else:
        socket = dict(unit.get("socketConfig", {}))
        if unit.get("listenStreams"):
            socket["ListenStream"] = unit["listenStreams"]
        lines += [""] + section("Socket", socket)
    text = "\n".join(lines) + "\n"

    shipped = os.path.join(base_dir, file_name)
    if os.path.exists(shipped):
        service = unit.get("serviceConfig", {})
        starts = [c for c in service.get("ExecStart", []) if c] if kind == "service" else []
        with open(shipped) as f:
            base = f.read()
        if starts:
            package = re.match(r'^"?(/nix/store/[^/]+)/', starts[0]).group(1)
            base = base.replace("/usr/local/bin/", f"{package}/bin/")
            for exe in re.findall(r"^ExecStart=(\S+)", base, re.M):
                stand_in(root, exe)
        with open(f"{unit_dir}/{file_name}", "w") as f:
            f.write(base)
        os.makedirs(f"{unit_dir}/{file_name}.d", exist_ok=True)
        with open(f"{unit_dir}/{file_name}.d/overrides.conf", "w") as f:
            f.write(text)
    else:
        with open(f"{unit_dir}/{file_name}", "w") as f:
            f.write(text)
    print(f"{unit_dir}/{file_name}")


def main():
    root, base_dir, *units = sys.argv[1:]
    report = json.load(sys.stdin)
    for full in units:
        name, kind = full.rsplit(".", 1)
        unit = report["systemd"][kind + "s"][name]
        render(root, base_dir, kind, name, unit)


main()
