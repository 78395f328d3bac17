# The checks of the one-host stack, written once against the NixOS test driver's Machine API
# (succeed, fail, wait_for_unit, wait_until_succeeds, wait_for_open_port) and its `subtest`.
# nixos/tests/one-host.nix runs them in the VM (`vm-one-host`); .ci/nixos-box runs the same
# functions in CI, in a real systemd (../shared/tools/systemd-box) whose units, configuration
# files and users were rendered from the module's evaluation. `p` holds what differs between the
# two: ports (CI uses private ones beside the machine's own servers) and the commands for
# rabbitmqctl and the AMQP permission probe (amqp-refused.py), which come from different places.
import json
import re
import shlex

# What a test waits for in the stack's Prometheus: the daemons' counters and RabbitMQ's per-queue
# depth as the `rabbitmq` job scrapes it (/metrics/detailed serves rabbitmq_detailed_*).
PROMETHEUS_SERIES = [
    "messages_processed_total",
    "messages_confirmed_total",
    'rabbitmq_detailed_queue_messages_ready{{queue="{queue}"}}',
    # postgres_exporter logged in (peer authentication, pg_monitor) and node_exporter's series the
    # host alerts read.
    "pg_up == 1",
    # The broker's alarms (only on /metrics: the `rabbitmq-node` job).
    "rabbitmq_alarms_memory_used_watermark",
    "node_filesystem_avail_bytes",
]
# The clock alerts' series: node_exporter's timex collector, which a container may not run
# (systemd-nspawn's seccomp filter refuses adjtimex), hence `p["clock"]`.
CLOCK_SERIES = ["node_timex_offset_seconds", "node_timex_sync_status"]

ONE_HOST_DEFAULTS = {
    "pg_port": 5432,
    "amqp_port": 5672,
    "rabbitmq_metrics_port": 15692,
    "prometheus_port": 9090,
    "alertmanager_port": 9093,
    "node_exporter_port": 9100,
    "postgres_exporter_port": 9187,
    "producer_port": 9101,
    "consumer_port": 9102,
    "queue": "weather_queue",
    "clock": True,
    "database": "weather",
}


def psql(p, sql):
    """psql as the postgres superuser, over the Unix socket."""
    return f"sudo -u postgres psql -X -p {p['pg_port']} -d {p['database']} -tAc {shlex.quote(sql)}"


def psql_as(p, user, role, sql):
    """psql as Unix user `user`, logging in as `role`: peer authentication through the stack's map."""
    conninfo = f"host=/run/postgresql port={p['pg_port']} dbname={p['database']} user={role}"
    return f"sudo -u {user} psql -X -v ON_ERROR_STOP=1 {shlex.quote(conninfo)} -tAc {shlex.quote(sql)}"


def refused(machine, command, reason):
    """`command` must fail, for `reason` (a regular expression its output must match): a refusal
    that fails for another cause (a wrong port, a missing user or binary) does not pass."""
    out = machine.fail(f"{command} 2>&1")
    assert re.search(reason, out), (command, out)


def rows(p):
    return psql(p, "SELECT count(*) FROM weather_logs")


def prometheus_query(p, query):
    return (
        f"curl -sf http://127.0.0.1:{p['prometheus_port']}/api/v1/query --data-urlencode {shlex.quote('query=' + query)}"
        " | jq -e '.data.result | length > 0'"
    )


def confirmed(machine):
    """Readings the producer had confirmed in its one run (its "Stopped." log line), once journald
    has stored that line, which may be after `systemctl stop` returns."""
    stopped = "journalctl -b -u producer.service -o json MESSAGE=Stopped."
    machine.wait_until_succeeds(f"{stopped} | jq -se 'length == 1'", timeout=60)
    return int(machine.succeed(f"{stopped} | jq -s 'map(.CONFIRMED | tonumber) | add'").strip())


PROMQL_WORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "group_left", "group_right", "inf", "nan"}


def rule_selectors(expr):
    """The series selectors of a PromQL expression (`name` or `name{...}`), without the label
    lists of by/without/on/ignoring/group_*, the ranges, the functions and the selectors inside
    absent(), which are there to match nothing."""
    expr = re.sub(r"absent\([^()]*\)", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    found = []
    for m in re.finditer(r"(?<![0-9.a-zA-Z_:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, matchers, call = m.groups()
        if call or name in PROMQL_WORDS:
            continue
        found.append(name + (matchers or ""))
    return found


def check_units_in_order(machine, p):
    with subtest("the units come up in order"):
        for unit in [
            "rabbitmq.service",
            "sistema-mensajes-rabbitmq-provision.service",
            "sistema-mensajes-rabbitmq-topology.service",
            "postgresql.target",
            "sistema-mensajes-postgresql-grants.service",
            "sistema-mensajes-postgresql-migrate.service",
            "consumer.service",
            "producer.service",
        ]:
            machine.wait_for_unit(unit)
        machine.wait_for_open_port(p["producer_port"])
        machine.wait_for_open_port(p["consumer_port"])

    with subtest("the producer publishes and rows appear in weather_logs"):
        machine.wait_until_succeeds(f"test $({rows(p)}) -gt 50", timeout=180)


def check_rabbitmq_users(machine, p):
    with subtest("no guest account; one broker user per daemon, one for the topology"):
        users = machine.succeed(f"{p['rabbitmqctl']} list_users --no-table-headers")
        names = [line.split()[0] for line in users.splitlines() if line.strip()]
        assert "guest" not in names, users
        assert {"sistema-producer", "sistema-consumer", "sistema-topology"} <= set(names), users

    with subtest("RabbitMQ: each daemon's user may do its own job only"):
        q = p["queue"]

        def refused(daemon):
            """amqp-refused.py as the daemon's broker user: each action must be refused (403)."""
            url = f"amqp://127.0.0.1:{p['amqp_port']}/%2f"
            return f"{p['amqp_refused']} {url} sistema-{daemon} /var/lib/sistema-mensajes-rabbitmq/{daemon}.password"

        # The producer may only publish readings: not consume them, nor declare, delete or dead-letter.
        machine.succeed(
            f"{refused('producer')} consume:{q} declare-queue:{q} delete-queue:{q} declare-exchange:weather publish:weather_dead_letter"
        )
        # The consumer may only consume readings and dead-letter them: not publish readings, declare or delete.
        machine.succeed(
            f"{refused('consumer')} publish:weather declare-exchange:weather declare-queue:{q} delete-queue:{q} consume:weather_dead_letter"
        )
        machine.succeed("journalctl -b -u sistema-mensajes-rabbitmq-topology.service | grep 'topology declared' >/dev/null")


def check_postgresql_roles(machine, p):
    with subtest("PostgreSQL: the consumer's role may insert, nothing more; the owner only migrates"):
        machine.succeed(
            "journalctl -b -u sistema-mensajes-postgresql-migrate.service | grep 'role .weather_writer. may insert' >/dev/null"
        )
        # The consumer's Unix user logs in as the writer...
        machine.succeed(f"test \"$({psql_as(p, 'sistema-consumer', 'weather_writer', 'SELECT current_user')})\" = weather_writer")
        # ...which may neither change nor remove rows, nor drop the table, nor read them...
        for sql in [
            "DELETE FROM weather_logs",
            "UPDATE weather_logs SET message_id = message_id",
            "TRUNCATE weather_logs",
            "DROP TABLE weather_logs",
            "SELECT * FROM weather_logs LIMIT 1",
            "SELECT message_id FROM weather_logs LIMIT 1",
            "SELECT weather_logs_maintain(now(), 7, NULL)",
        ]:
            refused(machine, psql_as(p, "sistema-consumer", "weather_writer", sql), "permission denied|must be owner")
        # ...and never as the owner; the migrations' Unix user does.
        refused(machine, psql_as(p, "sistema-consumer", "weather", "SELECT 1"), "Peer authentication failed")
        machine.succeed(f"test \"$({psql_as(p, 'sistema-migrate', 'weather', 'SELECT current_user')})\" = weather")
        assert int(machine.succeed(rows(p)).strip()) > 0

    with subtest("PostgreSQL: Grafana's role reads weather_logs (the event trigger's grant), nothing else"):
        machine.succeed(f"test \"$({psql_as(p, 'grafana', 'weather_reader', 'SHOW statement_timeout')})\" = 30s")
        n = int(machine.succeed(psql_as(p, "grafana", "weather_reader", "SELECT count(*) FROM weather_logs")).strip())
        assert n > 0, n
        refused(machine, psql_as(p, "grafana", "weather_reader", "SELECT count(*) FROM schema_migrations"), "permission denied")


def check_partitions(machine, p):
    with subtest("weather_logs is partitioned by day (the migrate unit converted it empty); consumer maintain runs as the owner"):
        # Its timer starts it a minute after boot; here, at once.
        machine.succeed("systemctl start sistema-mensajes-postgresql-maintain.service")
        machine.succeed("test \"$(systemctl show -p Result --value sistema-mensajes-postgresql-maintain.service)\" = success")
        # journald may store the unit's last line after the unit has ended.
        machine.wait_until_succeeds(
            "journalctl -b -u sistema-mensajes-postgresql-maintain.service | grep 'partitions of weather_logs maintained' >/dev/null",
            timeout=30,
        )
        assert machine.succeed(psql(p, "SELECT relkind FROM pg_class WHERE oid = 'weather_logs'::regclass")).strip() == "p"
        days = int(machine.succeed(psql(p, "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                           "WHERE i.inhparent = 'weather_logs'::regclass AND c.relname ~ '^weather_logs_p[0-9]{8}$'")).strip())
        assert days >= 8, days
        # The stack's retention (nodes.nix: 400d) reached it (a key quoted or not, as TOML allows).
        machine.succeed("grep -qxE '\"?retention\"? = \"400d\"' \"$(systemctl show -p ExecStart --value sistema-mensajes-postgresql-maintain.service"
                        " | grep -o '/nix/store/[^ ]*-migrate.toml')\"")


def check_loopback_only(machine, p):
    with subtest("the stack's services listen on loopback only"):
        keys = ["pg_port", "amqp_port", "rabbitmq_metrics_port", "prometheus_port", "alertmanager_port",
                "node_exporter_port", "postgres_exporter_port", "producer_port", "consumer_port"]
        ports = [p[k] for k in keys]
        for port in ports + p.get("more_ports", []):
            machine.wait_for_open_port(port)
            listening = machine.succeed(f"ss -ltnH 'sport = :{port}' | awk '{{ print $4 }}'").split()
            assert listening and all(a.startswith(("127.0.0.1:", "[::1]:")) for a in listening), (port, listening)


def check_status_and_journal(machine, p):
    with subtest("systemctl status and journalctl show the daemon's status and fields"):
        machine.succeed("systemctl status consumer.service | grep -E 'Status: \"stored [0-9]+ readings'")
        machine.succeed("journalctl -b -u consumer.service -o verbose | grep -E '^ +SCHEMA=public$'")
        machine.succeed("journalctl -b -u sistema-mensajes-postgresql-migrate.service | grep 'Applied database migration.' >/dev/null")
        machine.succeed("test \"$(systemctl show -p User --value consumer.service)\" = sistema-consumer")


def check_prometheus(machine, p):
    with subtest("Prometheus: every target up, and the pipeline's metrics"):
        machine.wait_for_unit("prometheus.service")
        machine.wait_until_succeeds(
            f"curl -sf http://127.0.0.1:{p['prometheus_port']}/api/v1/targets"
            " | jq -e '[.data.activeTargets[] | .labels.job + \"=\" + .health] | sort"
            " == [\"alertmanager=up\", \"consumer=up\", \"node=up\", \"postgres=up\", \"producer=up\", \"prometheus=up\", \"rabbitmq-node=up\", \"rabbitmq=up\"]'",
            timeout=180,
        )
        for series in PROMETHEUS_SERIES + (CLOCK_SERIES if p["clock"] else []):
            machine.wait_until_succeeds(prometheus_query(p, series.format(queue=p["queue"])), timeout=120)
        machine.succeed(f"curl -sf http://127.0.0.1:{p['prometheus_port']}/api/v1/rules | jq -e '.data.groups | length > 0'")

    with subtest("every selector of every rule matches a live series (a renamed metric or queue would not)"):
        rules = json.loads(machine.succeed(f"curl -sf http://127.0.0.1:{p['prometheus_port']}/api/v1/rules"))
        selectors = sorted({sel for g in rules["data"]["groups"] for r in g["rules"] for sel in rule_selectors(r["query"])})
        assert len(selectors) > 20, selectors
        skip = () if p["clock"] else tuple(CLOCK_SERIES) + ("node_timex_maxerror_seconds",)
        for sel in selectors:
            if not sel.startswith(skip):
                # A recording rule has a value from its first evaluation with data: up to two of
                # the stack's evaluation intervals (1 min by default) after the scrapes begin.
                machine.wait_until_succeeds(prometheus_query(p, sel), timeout=180)

    with subtest("Alertmanager receives SistemaWatchdog (the dead man's switch) from Prometheus"):
        machine.wait_for_unit("alertmanager.service")
        machine.wait_until_succeeds(
            f"curl -sf http://127.0.0.1:{p['alertmanager_port']}/api/v2/alerts"
            " | jq -e 'any(.[]; .labels.alertname == \"SistemaWatchdog\" and .status.state == \"active\")'",
            timeout=180,
        )


def check_restarts_lose_nothing(machine, p):
    with subtest("restarting PostgreSQL and RabbitMQ loses nothing"):
        machine.succeed("systemctl restart postgresql.service")
        machine.wait_for_unit("postgresql.target")
        machine.succeed("systemctl restart rabbitmq.service")
        machine.wait_for_unit("rabbitmq.service")
        before = int(machine.succeed(rows(p)).strip())
        machine.wait_until_succeeds(f"test $({rows(p)}) -gt {before + 50}", timeout=300)
        # One run (so one "Stopped." line); asked before the stop, while the unit is surely loaded.
        machine.succeed("test $(systemctl show -p NRestarts --value producer.service) -eq 0")
        machine.succeed("systemctl stop producer.socket producer.service")
        machine.wait_until_succeeds(
            f"test \"$({p['rabbitmqctl']} list_queues --no-table-headers name messages | awk '$1 == \"{p['queue']}\" {{ print $2 }}')\" = 0",
            timeout=180,
        )
        sent = confirmed(machine)
        assert sent > 0
        machine.wait_until_succeeds(f"test $({rows(p)}) -eq {sent}", timeout=120)


def check_tls(machine, p):
    """The one-host stack with TLS wherever one host has it (.ci/nixos-box --tls runs it between the
    Prometheus check and the restarts): the daemons reach RabbitMQ and PostgreSQL over TLS with the
    servers' certificates checked, plain text is refused where TLS is required, and Prometheus
    scrapes the daemons' /metrics over https with basic authentication. `p["tls"]` names the CA,
    the scrape user and the writer's password file."""
    p = {**ONE_HOST_DEFAULTS, **p}
    t = p["tls"]
    with subtest("TLS: the daemons' broker connections are TLS, none is plain"):
        conns = f"{p['rabbitmqctl']} list_connections user ssl --no-table-headers | awk '$1 ~ /^sistema-(producer|consumer)$/'"
        machine.wait_until_succeeds(f"test \"$({conns} | awk '$2 == \"true\"' | wc -l)\" -eq 2", timeout=60)
        machine.succeed(f"test -z \"$({conns} | awk '$2 != \"true\"')\"")

    with subtest("TLS: the consumer's database sessions are TLS; plain text over TCP is refused"):
        sessions = psql(p, "SELECT count(*) FILTER (WHERE s.ssl) || ' ' || count(*) FROM pg_stat_activity a"
                           " JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'weather_writer'")
        machine.wait_until_succeeds(f"read tls all <<<\"$({sessions})\" && test $tls -gt 0 -a $tls -eq $all", timeout=60)
        tcp = f"host=127.0.0.1 port={p['pg_port']} dbname={p['database']} user=weather_writer"
        password = f"PGPASSWORD=$(cat {t['writer_password']})"
        refused(machine, f"{password} psql -X {shlex.quote(tcp + ' sslmode=disable')} -c 'SELECT 1'", "no encryption")
        # With the password and the server's certificate checked, name included, the writer logs in.
        verified = shlex.quote(f"{tcp.replace('127.0.0.1', 'localhost')} sslmode=verify-full sslrootcert={t['ca']}")
        machine.succeed(f"test \"$({password} psql -X {verified} -tAc 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()')\" = t")
        refused(machine, f"{password} psql -X {verified.replace('localhost', '127.0.0.1')} -c 'SELECT 1'",
                r'server certificate for "localhost".* does not match host name "127.0.0.1"')

    with subtest("TLS: Prometheus scrapes the daemons over https with basic authentication; /metrics refuses others"):
        machine.wait_until_succeeds(
            f"curl -sf http://127.0.0.1:{p['prometheus_port']}/api/v1/targets | jq -e '[.data.activeTargets[]"
            " | select(.labels.job == \"producer\" or .labels.job == \"consumer\")"
            " | (.scrapeUrl | startswith(\"https://\")) and .health == \"up\"] | length == 2 and all'",
            timeout=120,
        )
        for port in (p["producer_port"], p["consumer_port"]):
            url = f"https://localhost:{port}/metrics"
            machine.succeed(f"curl -sf --cacert {t['ca']} -u {t['scrape_user']} {url} | grep '^# TYPE ' >/dev/null")
            machine.succeed(f"test \"$(curl -s -o /dev/null -w '%{{http_code}}' --cacert {t['ca']} {url})\" = 401")
            machine.succeed(f"test \"$(curl -s -o /dev/null -w '%{{http_code}}' --cacert {t['ca']} -u prometheus:wrong {url})\" = 401")
            # Answered, not in HTTP: an empty reply (52), a reset (56) or TLS's alert read as HTTP/0.9 (1);
            # not a refused connection (7) or a timeout (28), which the socket's access list would give.
            refused(machine, f"curl -sS --max-time 5 http://127.0.0.1:{port}/metrics", r"curl: \((1|52|56)\)")


def one_host_checks(machine, p, between=()):
    """Every shared check, in the order the VM test runs them; `between` runs after Prometheus's
    check and before the restarts (the VM test's Grafana checks)."""
    p = {**ONE_HOST_DEFAULTS, **p}
    check_units_in_order(machine, p)
    check_rabbitmq_users(machine, p)
    check_postgresql_roles(machine, p)
    check_partitions(machine, p)
    check_loopback_only(machine, p)
    check_status_and_journal(machine, p)
    check_prometheus(machine, p)
    for check in between:
        check()
    check_restarts_lose_nothing(machine, p)
