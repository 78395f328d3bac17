# CONFIG for eval.sh, on node backend (the split test's broker and database host): the stack with
# TLS for RabbitMQ and PostgreSQL, and Prometheus scraping the daemons over TLS with basic auth.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.stack = {
    tls = {
      caFile = "/run/secrets/ca.pem";
      certFile = "/run/secrets/backend.pem";
      keyFile = "/run/secrets/backend.key";
    };
    prometheus.daemonScrape = {
      caFile = "/run/secrets/ca.pem";
      username = "prometheus";
      passwordFile = "/run/secrets/scrape-password";
    };
  };
}
