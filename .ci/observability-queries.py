#!/usr/bin/env python3
"""Runs every query of the Grafana dashboards against real backends, for .ci/observability.

  observability-queries.py prom  PROM_URL DASHBOARD.json VAR=VALUE...
      Resolves the dashboard's template variables through Prometheus' API (label_values), as
      Grafana does, substitutes them and Grafana's interval variables, runs every panel target
      with /api/v1/query and prints "panel [refId] expr -> values". Fails if any returns no
      data or only NaN. VAR=VALUE pins a variable (values separated by ","), which must be
      among the values its query finds.

  observability-queries.py sql   SCHEMA FROM TO DASHBOARD.json
      Resolves the SQL variables, expands Grafana's PostgreSQL macros with the bounds FROM and
      TO (RFC 3339), runs every panel query with psql in SCHEMA, prints the rows it returned,
      and checks with EXPLAIN that each one reads weather_logs (each partition it reads)
      through an index, and prints which partitions it reads: those the time range prunes
      are not in the plan. With EXPLAIN_ANALYZE=1 it also prints each query's execution time.

Only the standard library: it runs wherever python3 does.
"""

import json
import math
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request

# Grafana's values for its interval variables, fixed for a short CI run scraped every second.
INTERVALS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}
# The readings index, on the table and on each partition (named after it by PostgreSQL).
INDEX = re.compile(r"weather_logs(_[a-z0-9]+)?_station(_id)?_measured_at_idx")
# A scan of the table or of one of its partitions.
SCAN = re.compile(r"(?<!Bitmap )(Seq Scan|Index Only Scan|Index Scan|Bitmap Heap Scan)(?: Backward)?(?: using \S+)? on (weather_logs\w*)")
# A day's partition: the time range pruned the plan to it, so reading it whole is bounded (the
# planner does so for today's, while it is small).
DAY = re.compile(r"weather_logs_p\d{8}")


def fail(msg):
    print(f"FAIL: {msg}")
    return 1


# ---------------------------------------------------------------- Prometheus


def api(prom, path, params):
    url = f"{prom}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def regex_escape(value):
    """Grafana's escaping of a multi-value variable in a PromQL regex (prometheusSpecialRegexEscape)."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value)


def substitute(text, values):
    for name in sorted(values, key=len, reverse=True):
        text = text.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    for var, value in INTERVALS.items():
        text = text.replace(var, value)
    return text


def label_values(prom, query, values):
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query, re.S)
    if not m:
        m1 = re.fullmatch(r"\s*label_values\((\w+)\)\s*", query)
        if not m1:
            raise RuntimeError(f"unsupported variable query {query}")
        return sorted(api(prom, f"/api/v1/label/{m1.group(1)}/values", {}))
    selector, label = substitute(m.group(1), values), m.group(2)
    series = api(prom, "/api/v1/series", {"match[]": selector})
    return sorted({s[label] for s in series if label in s})


def legend(fmt, labels):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "")


def fmt_value(v):
    f = float(v)
    if math.isnan(f):
        return "NaN"
    return f"{f:.4g}"


def prom_variables(prom, dash, pinned):
    """The values Grafana would give the dashboard's variables, formatted for PromQL; and failures."""
    values, failures = {}, 0
    for var in dash.get("templating", {}).get("list", []):
        found = label_values(prom, var["query"]["query"], values)
        if var["name"] in pinned:
            chosen = pinned[var["name"]].split(",")
            missing = [c for c in chosen if c not in found]
            if missing:
                failures += fail(f"variable {var['name']}: {missing} not among {found}")
        else:
            chosen = found
        if not chosen:
            failures += fail(f"variable {var['name']}: query {var['query']['query']} found nothing")
        multi = var.get("multi") or var.get("includeAll")
        values[var["name"]] = (
            "(" + "|".join(regex_escape(c) for c in chosen) + ")" if multi and len(chosen) != 1
            else regex_escape(chosen[0]) if multi and chosen
            else (chosen[0] if chosen else "")
        )
        print(f"variable ${var['name']} = {values[var['name']]}   (query finds: {', '.join(found)})")
    return values, failures


def prom_main(prom, dashboard, pins):
    dash = json.load(open(dashboard))
    pinned = dict(p.split("=", 1) for p in pins)
    print(f"-- {dashboard} (uid {dash['uid']}); interval variables: "
          + ", ".join(f"{k}={v}" for k, v in INTERVALS.items()))
    values, failures = prom_variables(prom, dash, pinned)
    checked = 0
    for panel in dash["panels"]:
        if panel["type"] == "row":
            print(f"== row: {panel['title']}")
            continue
        for t in panel.get("targets", []):
            expr = substitute(t["expr"], values)
            try:
                result = api(prom, "/api/v1/query", {"query": expr})["result"]
            except Exception as e:  # an invalid query is a failure, reported with the others
                failures += fail(f"{panel['title']} [{t['refId']}] {expr}: {e}")
                continue
            # Largest first, so that the series with data show before the zeros.
            result.sort(key=lambda r: -float(r["value"][1]) if not math.isnan(float(r["value"][1])) else math.inf)
            shown = [f"{legend(t.get('legendFormat'), r['metric']) or r['metric']}={fmt_value(r['value'][1])}"
                     for r in result]
            ok = result and any(not math.isnan(float(r["value"][1])) for r in result)
            status = "ok  " if ok else "FAIL"
            more = f" (+{len(shown) - 4} more)" if len(shown) > 4 else ""
            # The query as the panel holds it; the variables' values are printed above.
            print(f"{status} {panel['title']} [{t['refId']}] {t['expr']}\n       -> {'; '.join(shown[:4]) or 'no data'}{more}")
            if not ok:
                print(f"       ran: {expr}")
                failures += 1
            checked += 1
    print(f"-- {checked} PromQL targets, {failures} failed")
    return failures


# ---------------------------------------------------------------- PostgreSQL


def psql(schema, sql, csv=True):
    cmd = ["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
    cmd += ["--csv"] if csv else ["-A", "-t"]
    full = f"SET search_path = {schema};\n{sql}"
    out = subprocess.run(cmd, input=full, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return out.stdout


def seconds(interval):
    m = re.fullmatch(r"'?(\d+)([smhd])'?", interval.strip())
    if not m:
        raise RuntimeError(f"unsupported interval {interval}")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def expand_macros(sql, start, end):
    """Grafana's PostgreSQL macros as its backend expands them (pkg/tsdb/grafana-postgresql-datasource/macros.go)."""
    def group(m, alias):
        args = [a.strip() for a in m.group(1).split(",")]
        n = seconds(args[1])  # a fill argument (args[2]) is applied by Grafana after the query
        return f"floor(extract(epoch from {args[0]})/{n})*{n}" + (' AS "time"' if alias else "")

    sql = re.sub(r"\$__timeGroupAlias\(([^)]*)\)", lambda m: group(m, True), sql)
    sql = re.sub(r"\$__timeGroup\(([^)]*)\)", lambda m: group(m, False), sql)
    sql = re.sub(r"\$__timeFilter\(([^)]*)\)", lambda m: f"{m.group(1).strip()} BETWEEN '{start}' AND '{end}'", sql)
    sql = sql.replace("$__timeFrom()", f"'{start}'").replace("$__timeTo()", f"'{end}'")
    if "$__" in sql:
        raise RuntimeError(f"unexpanded macro in {sql}")
    return sql


def sql_quote(v):
    return "'" + v.replace("'", "''") + "'"


def plan_summary(plan):
    keep = [line.strip() for line in plan.splitlines()
            if "weather_logs" in line or "Index" in line or "Seq Scan" in line]
    # The station list of an "All" selection, shortened.
    return [re.sub(r"'\{([^}]{60,})\}'", lambda m: f"'{{<{m.group(1).count(',') + 1} stations>}}'", k)
            for k in keep]


def sql_of_target(target, values, start, end):
    """A panel's SQL with the variables substituted and the macros expanded."""
    raw = target["rawSql"]
    for name, v in values.items():
        raw = raw.replace(f"${name}", v)
    for var, value in INTERVALS.items():
        raw = raw.replace(var, value)
    return expand_macros(raw, start, end)


def sql_main(schema, start, end, dashboard):
    dash = json.load(open(dashboard))
    failures, values = 0, {}
    print(f"-- {dashboard} (uid {dash['uid']}); time range {start} .. {end}; "
          f"$__interval={INTERVALS['$__interval']}")
    queries = []
    for var in dash.get("templating", {}).get("list", []):
        rows = [r for r in psql(schema, expand_macros(var["query"], start, end), csv=False).splitlines() if r]
        values[var["name"]] = ",".join(sql_quote(r) for r in rows)
        print(f"variable ${var['name']}: {len(rows)} values ({', '.join(rows[:3])}, ...)")
        if not rows:
            failures += fail(f"variable {var['name']} found nothing")
        queries.append((f"variable ${var['name']}", var["query"], expand_macros(var["query"], start, end)))
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            queries.append((f"{panel['title']} [{t['refId']}]", t["rawSql"],
                            sql_of_target(t, values, start, end)))
    for title, panel_sql, sql in queries:
        analyze = os.environ.get("EXPLAIN_ANALYZE") == "1"
        try:
            out = psql(schema, sql).splitlines()
            plan = psql(schema, ("EXPLAIN (ANALYZE) " if analyze else "EXPLAIN ") + sql, csv=False)
        except RuntimeError as e:
            failures += fail(f"{title}: {e}")
            continue
        header, rows = (out[0], out[1:]) if out else ("", [])
        scans = SCAN.findall(plan)
        # Through the index, or pruned to whole days; never a whole table or default partition.
        uses_index = bool(scans) and not any(
            kind == "Seq Scan" and not DAY.fullmatch(rel) for kind, rel in scans
        ) and (bool(INDEX.search(plan)) or all(DAY.fullmatch(rel) for _, rel in scans))
        status = "ok  " if rows and uses_index else "FAIL"
        failures += status == "FAIL"
        print(f"{status} {title}: {' '.join(panel_sql.split())}")
        print(f"       -> {len(rows)} rows; columns {header}")
        if rows:
            print(f"       first row: {rows[0]}")
        print(f"       EXPLAIN: {' | '.join(plan_summary(plan))}")
        relations = sorted({rel for _, rel in scans})
        print(f"       reads {len(relations)} of weather_logs' relations: {', '.join(relations)}")
        if analyze:
            print(f"       {' '.join(l.strip() for l in plan.splitlines() if 'Execution Time' in l)}")
        if not uses_index:
            print(f"       -> does not read weather_logs through its index ({INDEX.pattern}), "
                  "or reads whole a relation that is not one day's partition")
    print(f"-- {len(queries)} SQL queries, {failures} failed")
    return failures


def main(argv):
    if len(argv) >= 3 and argv[0] == "prom":
        return prom_main(argv[1], argv[2], argv[3:])
    if len(argv) == 5 and argv[0] == "sql":
        return sql_main(*argv[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:]) else 0)
