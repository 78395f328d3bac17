#!/usr/bin/env python3
"""Draws each dashboard to a PNG without Grafana, for .ci/observability (OBSERVABILITY_RENDER_DIR).

  observability-render.py OUT_DIR PROM_URL SCHEMA FROM TO SECONDS pipeline.json readings.json VAR=VALUE...

An approximation, not Grafana's look: each panel sits at its gridPos, with its title, and shows
what its queries return: time series over the last SECONDS (query_range, or the SQL with the
macros expanded for FROM..TO), stats as text, bar gauges as bars, tables as tables. Needs
matplotlib; .ci/observability installs it in a throwaway virtualenv when asked to render.
"""

import datetime
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.dates

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

spec = importlib.util.spec_from_file_location("queries", Path(__file__).with_name("observability-queries.py"))
q = importlib.util.module_from_spec(spec)
spec.loader.exec_module(q)

ROW_INCH = 0.42   # one grid row (30 px in Grafana)
COL_INCH = 0.75   # one of 24 columns


def figure(dash):
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dash["panels"])
    fig = plt.figure(figsize=(24 * COL_INCH, rows * ROW_INCH + 0.6))
    fig.suptitle(f"{dash['title']}  (uid {dash['uid']}; drawn without Grafana)", fontsize=13, y=0.998)
    return fig, rows


def axes(fig, rows, gp, pad=0.25):
    x, y, w, h = gp["x"], gp["y"], gp["w"], gp["h"]
    left = (x + pad * 2.4) / 24   # room for the tick labels
    bottom = 1 - (y + h - pad) / rows
    return fig.add_axes([left, bottom, (w - pad * 3) / 24, (h - pad * 3) / rows])


def legend_or_count(ax, n):
    if 0 < n <= 8:
        ax.legend(fontsize=6, loc="upper left")
    elif n:
        ax.text(0.99, 0.98, f"{n} series", transform=ax.transAxes, ha="right", va="top", fontsize=7)


def prom_panel(ax, prom, panel, values, start, end):
    kind = panel["type"]
    lines = []
    for t in panel["targets"]:
        expr = q.substitute(t["expr"], values)
        if kind == "timeseries":
            res = q.api(prom, "/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": 2})["result"]
            for r in res:
                xs = [datetime.datetime.fromtimestamp(float(v[0])) for v in r["values"]]
                ys = [float(v[1]) for v in r["values"]]
                ax.plot(xs, ys, linewidth=1, label=q.legend(t.get("legendFormat"), r["metric"]) or t["refId"])
                lines.append(1)
        else:
            for r in q.api(prom, "/api/v1/query", {"query": expr})["result"]:
                lines.append((q.legend(t.get("legendFormat"), r["metric"]), float(r["value"][1])))
    if kind == "timeseries":
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M:%S"))
        legend_or_count(ax, len(lines))
    elif kind == "bargauge":
        lines.sort(key=lambda kv: kv[1])
        ax.barh([k for k, _ in lines], [v for _, v in lines], color="tab:orange")
        ax.tick_params(labelsize=6)
    else:  # stat
        ax.axis("off")
        for i, (name, v) in enumerate(lines):
            text = "NaN" if math.isnan(v) else f"{v:.4g}"
            mapped = {0.0: "NO", 1.0: "YES"}.get(v) if panel["fieldConfig"]["defaults"].get("mappings") else None
            ax.text(0.02 + 0.33 * (i % 3), 0.8 - 0.3 * (i // 3), f"{name}\n{mapped or text}", fontsize=8,
                    transform=ax.transAxes, va="top",
                    color={"NO": "red", "YES": "green"}.get(mapped, "black"))


def sql_panel(ax, schema, panel, values, start, end):
    t = panel["targets"][0]
    out = q.psql(schema, q.sql_of_target(t, values, start, end)).splitlines()
    header, rows = out[0].split(","), [r.split(",") for r in out[1:]]
    if t["format"] == "table":
        ax.axis("off")
        shown = [[c[:26] for c in r] for r in rows[:8]]
        table = ax.table(cellText=shown, colLabels=header, loc="upper center", fontsize=6)
        table.auto_set_font_size(False)
        table.set_fontsize(6)
        ax.text(0, -0.02, f"{len(rows)} rows (first 8 shown)", transform=ax.transAxes, fontsize=6, va="top")
        return
    series = {}
    for r in rows:
        series.setdefault(r[1], ([], []))
        series[r[1]][0].append(datetime.datetime.fromtimestamp(float(r[0])))
        series[r[1]][1].append(float(r[2]))
    style = "bars" if panel["fieldConfig"]["defaults"].get("custom", {}).get("drawStyle") == "bars" else "line"
    for name, (xs, ys) in series.items():
        if style == "bars":
            ax.plot(xs, ys, marker="s", linestyle="none", markersize=4, label=name)
        else:
            ax.plot(xs, ys, linewidth=1, label=name)
    ax.tick_params(labelsize=6)
    ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M"))
    legend_or_count(ax, len(series))


def draw(dash, out, panel_fn):
    fig, rows = figure(dash)
    for panel in dash["panels"]:
        if panel["type"] == "row":
            ax = axes(fig, rows, dict(panel["gridPos"], h=1), pad=0)
            ax.axis("off")
            ax.text(0, 0.2, panel["title"], fontsize=11, weight="bold", transform=ax.transAxes)
            continue
        ax = axes(fig, rows, panel["gridPos"])
        ax.set_title(panel["title"], fontsize=8, loc="left")
        try:
            panel_fn(ax, panel)
        except Exception as e:  # a panel that cannot be drawn says why, the others still are
            ax.text(0.5, 0.5, f"not drawn: {e}", ha="center", fontsize=7, transform=ax.transAxes, wrap=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"drawn: {out}")


def main(argv):
    out_dir, prom, schema, start, end, seconds, pipeline, readings, *pins = argv
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    now = time.time()
    dash = json.load(open(pipeline))
    values, _ = q.prom_variables(prom, dash, dict(p.split("=", 1) for p in pins))
    draw(dash, Path(out_dir) / f"{dash['uid']}.png",
         lambda ax, p: prom_panel(ax, prom, p, values, now - float(seconds), now))
    dash = json.load(open(readings))
    svalues = {}
    for var in dash["templating"]["list"]:
        found = [r for r in q.psql(schema, var["query"], csv=False).splitlines() if r]
        svalues[var["name"]] = ",".join(q.sql_quote(r) for r in found)
    draw(dash, Path(out_dir) / f"{dash['uid']}.png", lambda ax, p: sql_panel(ax, schema, p, svalues, start, end))


if __name__ == "__main__":
    main(sys.argv[1:])
