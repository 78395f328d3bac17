# The VM tests' node configurations, written once: nixos/tests/{one-host,split}.nix run them,
# and .ci/check-nix evaluates each with the offline module evaluator. Each node is a NixOS module.
#
# Secrets are store files here (pkgs.writeText), which is fine in a test VM only; on a real host
# point the same options at files outside the store.
let
  secrets =
    pkgs:
    let
      secret = name: text: "${pkgs.writeText name text}";
    in
    {
      grafana = {
        adminPasswordFile = secret "grafana-admin-password" "snakeoil-admin";
        secretKeyFile = secret "grafana-secret-key" "snakeoil-secret-key";
      };
      broker = {
        producer = secret "producer-amqp-password" "snakeoil-producer";
        consumer = secret "consumer-amqp-password" "snakeoil-consumer";
      };
      database = secret "weather-db-password" "snakeoil-db";
    };

  # A consumer on its own host: remote broker and database, with passwords. A short AMQP
  # heartbeat, so the broker notices a crashed consumer host soon and requeues its deliveries.
  consumerHost =
    { pkgs, ... }:
    {
      services.sistema-mensajes.consumer = {
        enable = true;
        settings = {
          amqp.url = "amqp://sistema-consumer@backend:5672/%2f?heartbeat=5";
          postgres.url = "postgres://weather@backend:5432/weather";
        };
        credentials = {
          amqp-password = (secrets pkgs).broker.consumer;
          postgres-password = (secrets pkgs).database;
        };
        metrics = {
          listenAddress = "0.0.0.0";
          openFirewall = true;
        };
      };
    };
in
{
  # Everything on one host, with the defaults: peer authentication, generated broker passwords.
  machine =
    { pkgs, ... }:
    {
      services.sistema-mensajes = {
        stack = {
          enable = true;
          inherit (secrets pkgs) grafana;
        };
        producer = {
          enable = true;
          settings.simulation = {
            stations = 5;
            rate = 20.0;
          };
        };
        consumer.enable = true;
      };
    };

  # Split: the broker, the database and the monitoring on one host...
  backend =
    { pkgs, ... }:
    {
      services.sistema-mensajes.stack = {
        enable = true;
        inherit (secrets pkgs) grafana;
        rabbitmq = {
          listenAddress = "0.0.0.0";
          openFirewall = true;
          users = {
            producer.passwordFile = (secrets pkgs).broker.producer;
            consumer.passwordFile = (secrets pkgs).broker.consumer;
          };
        };
        postgresql.tcp = {
          enable = true;
          passwordFile = (secrets pkgs).database;
          openFirewall = true;
        };
        prometheus.targets = {
          producer = [ "producer:9101" ];
          consumer = [
            "consumer1:9102"
            "consumer2:9102"
          ];
        };
      };
    };

  # ...two consumer hosts...
  consumer1 = consumerHost;
  consumer2 = consumerHost;

  # ...and a producer host.
  producer =
    { pkgs, ... }:
    {
      services.sistema-mensajes.producer = {
        enable = true;
        settings = {
          amqp.url = "amqp://sistema-producer@backend:5672/%2f";
          simulation = {
            stations = 10;
            rate = 50.0;
          };
        };
        credentials.amqp-password = (secrets pkgs).broker.producer;
        metrics = {
          listenAddress = "0.0.0.0";
          openFirewall = true;
        };
      };
    };
}
