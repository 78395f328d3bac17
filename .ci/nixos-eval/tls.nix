# CONFIG for eval.sh, on node consumer1: TLS to the broker (client certificate, EXTERNAL login) and
# to PostgreSQL (verify-full), and /metrics over TLS with client certificates and basic auth. The
# files are credentials (root's, as a secrets manager leaves them); the URLs name them under
# /run/credentials/consumer.service, and a web configuration file names the metrics ones.
{ lib, ... }:
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer = {
    settings.amqp.url = lib.mkForce "amqps://rabbit.example:5671/%2f?auth_mechanism=external";
    settings.postgres.url = lib.mkForce "postgres://weather_writer@db.example:5432/weather?sslmode=verify-full";
    # (The split test's consumer1 already has a CA and a /metrics certificate: replaced here.)
    credentials = lib.mapAttrs (_: lib.mkForce) {
      amqp-tls-ca = "/run/secrets/ca.pem";
      amqp-tls-cert = "/run/secrets/consumer.pem";
      amqp-tls-key = "/run/secrets/consumer.key";
      postgres-tls-ca = "/run/secrets/ca.pem";
      metrics-tls-cert = "/run/secrets/metrics.pem";
      metrics-tls-key = "/run/secrets/metrics.key";
      metrics-client-ca = "/run/secrets/scrapers-ca.pem";
    };
    metrics.basicAuthUsers = lib.mkForce {
      prometheus = "$2y$10$abcdefghijklmnopqrstuuJ0N6Wb2Xx4lHHl8E3A0pWvJXP4dQXeS";
    };
  };
}
