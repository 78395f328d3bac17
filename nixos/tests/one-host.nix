# VM test: everything on one host (flake check `vm-one-host`). The node is nodes.nix's `machine`.
{ pkgs, ... }:
let
  # The checks' commands that come from the VM's packages (nixos/tests/one_host_checks.py).
  pika = pkgs.python3.withPackages (ps: [ ps.pika ]);
  rabbitmqctl = pkgs.writeShellScript "rabbitmqctl-as-rabbitmq" ''
    exec su -s ${pkgs.runtimeShell} rabbitmq -c "rabbitmqctl $(printf '%q ' "$@")"
  '';
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

  # The checks are shared with CI (.ci/nixos-box runs them under a real systemd); only Grafana's
  # stay here, since its server cannot run there.
  testScript = builtins.readFile ./one_host_checks.py + ''

    import json


    def grafana_checks():
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


    start_all()
    one_host_checks(
        machine,
        {
            "rabbitmqctl": "${rabbitmqctl}",
            "amqp_refused": "${pika}/bin/python3 ${./amqp-refused.py}",
            # Grafana's port, besides the stack's ports the checks know.
            "more_ports": [3000],
        },
        between=[grafana_checks],
    )
  '';
}
