# VM test: everything on one host (flake check `vm-one-host`). The node is nodes.nix's `machine`.
{ pkgs, ... }:
let
  psql = sql: "sudo -u postgres psql -d weather -tAc ${pkgs.lib.escapeShellArg sql}";
  rows = psql "SELECT count(*) FROM weather_logs";
  rabbitmqctl = args: "su -s ${pkgs.runtimeShell} rabbitmq -c 'rabbitmqctl ${args}'";
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
        """Readings the producer had confirmed, summed over its runs (its "Stopped." log line)."""
        out = machine.succeed("journalctl -u producer.service -o json MESSAGE=Stopped. | jq -s 'map(.CONFIRMED | tonumber) | add // 0'")
        return int(out.strip())

    start_all()

    with subtest("the units come up in order"):
        machine.wait_for_unit("rabbitmq.service")
        machine.wait_for_unit("sistema-mensajes-rabbitmq-provision.service")
        machine.wait_for_unit("postgresql.target")
        machine.wait_for_unit("sistema-mensajes-postgresql-grants.service")
        machine.wait_for_unit("consumer.service")
        machine.wait_for_unit("producer.service")
        machine.wait_for_open_port(9101)
        machine.wait_for_open_port(9102)

    with subtest("the producer publishes and rows appear in weather_logs"):
        machine.wait_until_succeeds("test $(${rows}) -gt 50", timeout=180)

    with subtest("no guest account; one broker user per daemon"):
        users = machine.succeed("${rabbitmqctl "list_users --no-table-headers"}")
        assert "guest" not in users, users
        assert "sistema-producer" in users and "sistema-consumer" in users, users

    with subtest("systemctl status and journalctl show the daemon's status and fields"):
        machine.succeed("systemctl status consumer.service | grep -E 'Status: \"stored [0-9]+ readings'")
        machine.succeed("journalctl -u consumer.service -o verbose | grep -E '^ +SCHEMA=public$'")
        machine.succeed("journalctl -u consumer.service | grep -q 'Applied database migration.'")
        machine.succeed("test \"$(systemctl show -p User --value consumer.service)\" = sistema-consumer")

    with subtest("Prometheus: every target up, and the pipeline's metrics"):
        machine.wait_for_unit("prometheus.service")
        machine.wait_until_succeeds(
            "curl -sf http://127.0.0.1:9090/api/v1/targets"
            " | jq -e '[.data.activeTargets[] | .labels.job + \"=\" + .health] | sort"
            " == [\"consumer=up\", \"producer=up\", \"prometheus=up\", \"rabbitmq=up\"]'",
            timeout=180,
        )
        for query in ["messages_processed_total", "messages_confirmed_total", 'rabbitmq_queue_messages_ready{queue="weather_queue"}']:
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
        machine.succeed("systemctl stop producer.socket producer.service")
        machine.wait_until_succeeds("test \"$(${rabbitmqctl "list_queues --no-table-headers name messages"} | awk '$1 == \"weather_queue\" { print $2 }')\" = 0", timeout=180)
        sent = confirmed()
        assert sent > 0
        machine.wait_until_succeeds(f"test $(${rows}) -eq {sent}", timeout=120)
        machine.succeed("test $(systemctl show -p NRestarts --value producer.service) -eq 0")
  '';
}
