# VM test: the stack split by options alone (flake check `vm-split`). `backend` runs RabbitMQ,
# PostgreSQL, Prometheus and Grafana; two consumer hosts and a producer host reach it with
# passwords, over TLS only (the backend's plain AMQP port is loopback's, its PostgreSQL rejects
# plain TCP from the network), and its Prometheus scrapes their /metrics over TLS with a password.
# One consumer host loses power mid-stream; every reading the producer had confirmed must be
# stored exactly once. The nodes are nodes.nix's.
{ pkgs, ... }:
let
  nodes = import ./nodes.nix;
  vm = node: {
    imports = [ nodes.${node} ];
    virtualisation.memorySize = if node == "backend" then 3072 else 1024;
    environment.systemPackages = [
      pkgs.curl
      pkgs.jq
    ];
  };
  psql = sql: "sudo -u postgres psql -d weather -tAc ${pkgs.lib.escapeShellArg sql}";
  # /metrics of a daemon host, as the backend's Prometheus reads it: https, the test CA, basic auth.
  scrape = "curl -sf --max-time 5 --cacert /etc/sistema-test/tls-ca -u prometheus:snakeoil-scrape";
  rows = psql "SELECT count(*) FROM weather_logs";
in
{
  name = "sistema-mensajes-split";

  nodes = {
    backend = vm "backend";
    consumer1 = vm "consumer1";
    consumer2 = vm "consumer2";
    # The producer starts when the test says so (below), so its runs are the test's.
    producer = {
      imports = [ (vm "producer") ];
      systemd.services.producer.wantedBy = pkgs.lib.mkForce [ ];
      systemd.sockets.producer.wantedBy = pkgs.lib.mkForce [ ];
    };
  };

  testScript = ''
    backend.start()
    backend.wait_for_unit("sistema-mensajes-rabbitmq-provision.service")
    backend.wait_for_unit("sistema-mensajes-rabbitmq-topology.service")
    backend.wait_for_unit("sistema-mensajes-postgresql-grants.service")
    backend.wait_for_unit("sistema-mensajes-postgresql-migrate.service")
    backend.wait_for_open_port(5672)
    backend.wait_for_open_port(5671)
    backend.wait_for_open_port(5432)

    with subtest("both consumers connect over the network, over TLS, with passwords"):
        for c in [consumer1, consumer2]:
            c.start()
            c.wait_for_unit("consumer.service")
            c.wait_for_open_port(9102)

    with subtest("the producer publishes; both consumers store"):
        producer.start()
        producer.wait_for_unit("multi-user.target")
        producer.succeed("systemctl start producer.socket producer.service")
        producer.wait_for_unit("producer.service")
        backend.wait_until_succeeds("test $(${rows}) -gt 300", timeout=300)
        for c in [consumer1, consumer2]:
            # pipefail: a failed curl fails the check, whatever awk makes of a partial answer.
            c.wait_until_succeeds(
                f"set -o pipefail; ${scrape} --resolve {c.name}:9102:127.0.0.1 https://{c.name}:9102/metrics"
                " | awk '$1 == \"messages_processed_total\" && $2 > 0 { found = 1 } END { exit !found }'",
                timeout=120,
            )

    with subtest("only the backend's Prometheus reaches the metrics sockets; the backend's own stay closed"):
        # The producer host is on the network and port 9102 is open in the consumers' firewall,
        # but their sockets accept loopback and the backend only (metrics.allowFrom).
        for c in ["consumer1", "consumer2"]:
            producer.fail(f"${scrape} https://{c}:9102/metrics")
        backend.succeed("${scrape} https://consumer1:9102/metrics | grep messages_processed_total >/dev/null")
        # Without the password: 401; in plain text: no answer.
        backend.succeed(
            "test \"$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert /etc/sistema-test/tls-ca"
            " https://consumer1:9102/metrics)\" = 401"
        )
        backend.fail("curl -sf --max-time 5 http://consumer1:9102/metrics")
        # The broker's unauthenticated metrics and Prometheus listen on the backend's loopback only.
        consumer1.fail("curl -sf --max-time 5 http://backend:15692/metrics")
        consumer1.fail("curl -sf --max-time 5 http://backend:9090/-/ready")
        backend.succeed("curl -sf --max-time 5 http://127.0.0.1:9090/-/ready")
        # consumer2 names the backend by address: its service may reach that address only.
        consumer2.succeed("test -n \"$(systemctl show -p IPAddressDeny --value consumer.service)\"")
        consumer1.succeed("test -z \"$(systemctl show -p IPAddressDeny --value consumer.service)\"")

    with subtest("other hosts reach the broker and the database over TLS only"):
        consumer1.fail("timeout 5 bash -c '</dev/tcp/backend/5672'")
        consumer1.succeed("timeout 5 bash -c '</dev/tcp/backend/5671'")
        writer_at = "PGPASSWORD=snakeoil-writer psql -X -v ON_ERROR_STOP=1 'host=backend dbname=weather user=weather_writer"
        backend.fail(f"{writer_at} sslmode=disable' -tAc 'SELECT 1'")
        backend.succeed(f"{writer_at} sslmode=verify-full sslrootcert=/etc/sistema-test/tls-ca' -tAc 'SELECT 1'")
        # The daemons' own sessions: TLS, both consumers' on PostgreSQL, every one on RabbitMQ.
        backend.wait_until_succeeds(
            "test $(${psql "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = $$weather_writer$$ AND ssl"}) -ge 2",
            timeout=60,
        )
        connections = backend.succeed(
            "su -s ${pkgs.runtimeShell} rabbitmq -c 'rabbitmqctl list_connections --no-table-headers user ssl'"
        )
        remote = [l.split() for l in connections.splitlines() if l.startswith(("sistema-consumer", "sistema-producer"))]
        assert len(remote) >= 3 and all(ssl == "true" for _, ssl in remote), connections

    with subtest("the writer role over TCP may insert, nothing more"):
        writer = "PGPASSWORD=snakeoil-writer psql -X -v ON_ERROR_STOP=1 'host=192.168.1.1 dbname=weather user=weather_writer' -tAc"
        backend.succeed(f"{writer} 'SELECT 1 FROM schema_migrations LIMIT 1'")
        for sql in ["DELETE FROM weather_logs", "DROP TABLE weather_logs", "SELECT * FROM weather_logs LIMIT 1"]:
            backend.fail(f"{writer} '{sql}'")
        # The owner's password logs in over TCP too (tcp.ownerPasswordFile is set here).
        backend.succeed("PGPASSWORD=snakeoil-owner psql -X 'host=192.168.1.1 dbname=weather user=weather' -tAc 'SELECT 1'")
        backend.fail("PGPASSWORD=wrong psql -X 'host=192.168.1.1 dbname=weather user=weather_writer' -tAc 'SELECT 1'")

    with subtest("Prometheus on the backend scrapes every host, the daemons over TLS with a password"):
        backend.wait_until_succeeds(
            "curl -sf http://127.0.0.1:9090/api/v1/targets"
            " | jq -e '.data.activeTargets | all(.health == \"up\")"
            " and ([.[] | select(.labels.job == \"consumer\" or .labels.job == \"producer\") | .scrapeUrl] | sort"
            " == [\"https://consumer1:9102/metrics\", \"https://consumer2:9102/metrics\", \"https://producer:9101/metrics\"])'",
            timeout=180,
        )

    with subtest("a consumer host loses power mid-stream"):
        before = int(backend.succeed("${rows}").strip())
        consumer1.crash()
        # consumer2 carries on, and gets consumer1's unacknowledged deliveries once the broker
        # has noticed (AMQP heartbeat of 5 s).
        backend.wait_until_succeeds(f"test $(${rows}) -gt {before + 300}", timeout=300)

    with subtest("every reading the producer had confirmed is stored, once"):
        # One run, so one "Stopped." line below. Asked before the stop: a stopped unit nothing
        # wants may be unloaded, and a reloaded one counts 0 restarts.
        producer.succeed("test $(systemctl show -p NRestarts --value producer.service) -eq 0")
        producer.succeed("systemctl stop producer.socket producer.service")
        # journald may store the daemon's last line after `systemctl stop` returns: wait for it.
        stopped = "journalctl -u producer.service -o json MESSAGE=Stopped."
        producer.wait_until_succeeds(f"{stopped} | jq -se 'length == 1'", timeout=60)
        sent = int(producer.succeed(f"{stopped} | jq -s 'map(.CONFIRMED | tonumber) | add'").strip())
        assert sent > 0, sent
        # The rows equal the readings the producer had confirmed (message_id is the primary key, so
        # a duplicate cannot be a second row: a count against itself would prove nothing).
        backend.wait_until_succeeds(f"test $(${rows}) -eq {sent}", timeout=300)
        backend.wait_until_succeeds(
            "test \"$(su -s ${pkgs.runtimeShell} rabbitmq -c 'rabbitmqctl list_queues --no-table-headers name messages'"
            " | awk '$1 == \"weather_queue\" { print $2 }')\" = 0",
            timeout=120,
        )
  '';
}
