# CONFIG for ../shared/nixos-eval/eval.sh: box-node.nix with TLS wherever one host has it
# (.ci/nixos-box --tls). The stack's RabbitMQ and PostgreSQL serve TLS (`stack.tls`), the daemons
# reach them over it with the servers' certificates checked (amqps://, sslmode=verify-full, as
# the split test's remote daemons do), and serve /metrics over TLS with basic authentication,
# which this host's Prometheus scrapes with `stack.prometheus.daemonScrape` (the module refuses the
# two sides if they disagree). .ci/nixos-box writes the files below into the box at run time (a
# test PKI made with openssl, root's, 0400, as a secrets manager leaves them); none is in the store.
# Option sources: nixos/stack.nix (stack.tls, stack.rabbitmq.tls.port, stack.postgresql.tcp,
# stack.prometheus.daemonScrape) and nixos/daemon.nix (credentials, metrics.basicAuthUsers).
{ lib, ... }:
let
  file = name: "/etc/sistema-box/tls/${name}";
  localhost = [
    "127.0.0.1/32"
    "::1/128"
  ];
  # /metrics over TLS for the user `prometheus` (bcrypt of "snakeoil-scrape", as nodes.nix).
  metrics = {
    basicAuthUsers.prometheus = "$2b$10$Iwtfg9wyqAHowaicJUbuG.7yAq5ubxYRquBMmaDEvI5b/XOlbJzFm";
  };
  metricsCredentials = {
    amqp-tls-ca = file "ca.pem";
    metrics-tls-cert = file "metrics.pem";
    metrics-tls-key = file "metrics.key";
  };
in
{
  imports = [ ./box-node.nix ];
  # nixpkgs' postgresql.nix sets listen_addresses = "*" with enableTCPIP (stack.postgresql.tcp), at
  # normal priority; this host's TCP logins come from loopback only.
  services.postgresql.settings.listen_addresses = lib.mkForce "localhost";
  services.sistema-mensajes = {
    stack = {
      tls = {
        caFile = file "ca.pem";
        certFile = file "server.pem";
        keyFile = file "server.key";
      };
      rabbitmq.tls.port = 5683;
      postgresql.tcp = {
        enable = true;
        writerPasswordFile = file "writer-password";
        allowFrom = localhost;
      };
      # The daemons' certificate names `localhost`; their job scrapes them at 127.0.0.1.
      prometheus.daemonScrape = {
        caFile = file "ca.pem";
        serverName = "localhost";
        username = "prometheus";
        passwordFile = file "scrape-password";
      };
    };
    producer = {
      settings.amqp.url = "amqps://sistema-producer@localhost:5683/%2f";
      credentials = metricsCredentials;
      inherit metrics;
    };
    consumer = {
      settings = {
        amqp.url = "amqps://sistema-consumer@localhost:5683/%2f";
        postgres.url = "postgres://weather_writer@localhost:5442/weather?sslmode=verify-full";
      };
      credentials = metricsCredentials // {
        postgres-password = file "writer-password";
        postgres-tls-ca = file "ca.pem";
      };
      inherit metrics;
    };
  };
}
