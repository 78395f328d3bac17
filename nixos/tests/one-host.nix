# VM test: everything on one host (flake check `vm-one-host`). The node is nodes.nix's `machine`.
{ pkgs, ... }:
let
  psql = sql: "sudo -u postgres psql -d weather -tAc ${pkgs.lib.escapeShellArg sql}";
  rows = psql "SELECT count(*) FROM weather_logs";
  rabbitmqctl = args: "su -s ${pkgs.runtimeShell} rabbitmq -c 'rabbitmqctl ${args}'";
  # psqlAs UNIX-USER ROLE SQL: over the Unix socket, peer authentication through the stack's map.
  psqlAs =
    user: role: sql:
    "sudo -u ${user} psql -X -v ON_ERROR_STOP=1 'host=/run/postgresql dbname=weather user=${role}' -tAc ${pkgs.lib.escapeShellArg sql}";
  # amqp-refused USER ACTION...: the broker must refuse the user each action (403).
  pika = pkgs.python3.withPackages (ps: [ ps.pika ]);
  amqpRefused =
    user: actions:
    "${pika}/bin/python3 ${./amqp-refused.py} amqp://127.0.0.1:5672/%2f sistema-${user}"
    + " /var/lib/sistema-mensajes-rabbitmq/${user}.password ${actions}";
  # A query through Grafana's PostgreSQL datasource: grafana-count TABLE prints the JSON answer.
  grafanaCount = pkgs.writeShellScript "grafana-count" ''
    ${pkgs.curl}/bin/curl -sf -u admin:snakeoil-admin -H 'Content-Type: application/json' \
      -d '{"from":"now-1h","to":"now","queries":[{"refId":"A","datasource":{"uid":"sistema-postgres"},"format":"table","rawSql":"SELECT count(*) AS n FROM '"$1"'"}]}' \
      http://127.0.0.1:3000/api/ds/query
  '';
in
{
  name = "sistema-mensajes-one-host";

  nodes.machine = {
    imports = [ (import ./nodes.nix).machine ];
    virtualisation = {
      memorySize = 3072;
      diskSize = 4096;
      cores = 2;
    };
    environment.systemPackages = [
      pkgs.curl
      pkgs.jq
    ];
  };

  testScript = ''
    import json

    def confirmed():
        """Readings the producer had confirmed in its one run (its "Stopped." log line), once
        journald has stored that line, which may be after `systemctl stop` returns."""
        stopped = "journalctl -u producer.service -o json MESSAGE=Stopped."
        machine.wait_until_succeeds(f"{stopped} | jq -se 'length == 1'", timeout=60)
        return int(machine.succeed(f"{stopped} | jq -s 'map(.CONFIRMED | tonumber) | add'").strip())

    start_all()

    with subtest("the units come up in order"):
        machine.wait_for_unit("rabbitmq.service")
        machine.wait_for_unit("sistema-mensajes-rabbitmq-provision.service")
        machine.wait_for_unit("sistema-mensajes-rabbitmq-topology.service")
        machine.wait_for_unit("postgresql.target")
        machine.wait_for_unit("sistema-mensajes-postgresql-grants.service")
        machine.wait_for_unit("sistema-mensajes-postgresql-migrate.service")
        machine.wait_for_unit("consumer.service")
        machine.wait_for_unit("producer.service")
        machine.wait_for_open_port(9101)
        machine.wait_for_open_port(9102)

    with subtest("the producer publishes and rows appear in weather_logs"):
        machine.wait_until_succeeds("test $(${rows}) -gt 50", timeout=180)

    with subtest("no guest account; one broker user per daemon, one for the topology"):
        users = machine.succeed("${rabbitmqctl "list_users --no-table-headers"}")
        assert "guest" not in users, users
        assert "sistema-producer" in users and "sistema-consumer" in users and "sistema-topology" in users, users

    with subtest("RabbitMQ: each daemon's user may do its own job only"):
        # The producer may only publish readings: not consume them, nor declare, delete or dead-letter.
        machine.succeed("${amqpRefused "producer" "consume:weather_queue declare-queue:weather_queue delete-queue:weather_queue declare-exchange:weather publish:weather_dead_letter"}")
        # The consumer may only consume readings and dead-letter them: not publish readings, declare or delete.
        machine.succeed("${amqpRefused "consumer" "publish:weather declare-exchange:weather declare-queue:weather_queue delete-queue:weather_queue consume:weather_dead_letter"}")
        machine.succeed("journalctl -u sistema-mensajes-rabbitmq-topology.service | grep -q 'topology declared'")

    with subtest("PostgreSQL: the consumer's role may insert, nothing more; the owner only migrates"):
        machine.succeed("journalctl -u sistema-mensajes-postgresql-migrate.service | grep -q 'role .weather_writer. may insert'")
        # The consumer's Unix user logs in as the writer...
        machine.succeed("test \"$(${
          psqlAs "sistema-consumer" "weather_writer" "SELECT current_user"
        })\" = weather_writer")
        # ...which may neither change nor remove rows, nor drop the table, nor read them (it sees
        # only message_id, for ON CONFLICT)...
        for sql in ["DELETE FROM weather_logs", "UPDATE weather_logs SET message_id = message_id", "TRUNCATE weather_logs", "DROP TABLE weather_logs", "SELECT * FROM weather_logs LIMIT 1"]:
            machine.fail(f"${psqlAs "sistema-consumer" "weather_writer" "{sql}"}")
        # ...and never as the owner; the migrations' Unix user does.
        machine.fail("${psqlAs "sistema-consumer" "weather" "SELECT 1"}")
        machine.succeed("test \"$(${
          psqlAs "sistema-migrate" "weather" "SELECT current_user"
        })\" = weather")
        assert int(machine.succeed("${rows}").strip()) > 0
        # Grafana's role reads, one statement for at most 30 s.
        machine.succeed("test \"$(${
          psqlAs "grafana" "weather_reader" "SHOW statement_timeout"
        })\" = 30s")

    with subtest("the stack's services listen on loopback only"):
        # PostgreSQL, AMQP, RabbitMQ's metrics, Prometheus, Grafana, the daemons' metrics sockets.
        for port in [5432, 5672, 15692, 9090, 3000, 9101, 9102]:
            machine.wait_for_open_port(port)
            listening = machine.succeed(f"ss -ltnH 'sport = :{port}' | awk '{{ print $4 }}'").split()
            assert listening and all(a.startswith(("127.0.0.1:", "[::1]:")) for a in listening), (port, listening)

    with subtest("systemctl status and journalctl show the daemon's status and fields"):
        machine.succeed("systemctl status consumer.service | grep -E 'Status: \"stored [0-9]+ readings'")
        machine.succeed("journalctl -u consumer.service -o verbose | grep -E '^ +SCHEMA=public$'")
        machine.succeed("journalctl -u sistema-mensajes-postgresql-migrate.service | grep -q 'Applied database migration.'")
        machine.succeed("test \"$(systemctl show -p User --value consumer.service)\" = sistema-consumer")

    with subtest("Prometheus: every target up, and the pipeline's metrics"):
        machine.wait_for_unit("prometheus.service")
        machine.wait_until_succeeds(
            "curl -sf http://127.0.0.1:9090/api/v1/targets"
            " | jq -e '[.data.activeTargets[] | .labels.job + \"=\" + .health] | sort"
            " == [\"consumer=up\", \"producer=up\", \"prometheus=up\", \"rabbitmq=up\"]'",
            timeout=180,
        )
        for query in ["messages_processed_total", "messages_confirmed_total", 'rabbitmq_detailed_queue_messages_ready{queue="weather_queue"}']:
            machine.wait_until_succeeds(
                f"curl -sf http://127.0.0.1:9090/api/v1/query --data-urlencode 'query={query}' | jq -e '.data.result | length > 0'",
                timeout=120,
            )
        machine.succeed("curl -sf http://127.0.0.1:9090/api/v1/rules | jq -e '.data.groups | length > 0'")

    with subtest("Grafana: datasources, dashboards, and rows through the read-only role"):
        machine.wait_for_unit("grafana.service")
        machine.wait_for_open_port(3000)
        for uid in ["sistema-prometheus", "sistema-postgres"]:
            machine.wait_until_succeeds(f"curl -sf -u admin:snakeoil-admin http://127.0.0.1:3000/api/datasources/uid/{uid}", timeout=120)
        machine.wait_until_succeeds(
            "curl -sf -u admin:snakeoil-admin 'http://127.0.0.1:3000/api/search?type=dash-db' | jq -e 'length >= 2'",
            timeout=120,
        )
        result = json.loads(machine.succeed("${grafanaCount} weather_logs"))
        n = result["results"]["A"]["frames"][0]["data"]["values"][0][0]
        assert n > 0, result
        # The role reads weather_logs and nothing else.
        machine.fail("${grafanaCount} schema_migrations | jq -e '.results.A.frames[0].data.values[0][0] >= 0'")

    with subtest("restarting PostgreSQL and RabbitMQ loses nothing"):
        machine.succeed("systemctl restart postgresql.service")
        machine.wait_for_unit("postgresql.target")
        machine.succeed("systemctl restart rabbitmq.service")
        machine.wait_for_unit("rabbitmq.service")
        before = int(machine.succeed("${rows}").strip())
        machine.wait_until_succeeds(f"test $(${rows}) -gt {before + 50}", timeout=300)
        # One run (so one "Stopped." line); asked before the stop, while the unit is surely loaded.
        machine.succeed("test $(systemctl show -p NRestarts --value producer.service) -eq 0")
        machine.succeed("systemctl stop producer.socket producer.service")
        machine.wait_until_succeeds("test \"$(${rabbitmqctl "list_queues --no-table-headers name messages"} | awk '$1 == \"weather_queue\" { print $2 }')\" = 0", timeout=180)
        sent = confirmed()
        assert sent > 0
        machine.wait_until_succeeds(f"test $(${rows}) -eq {sent}", timeout=120)
  '';
}
