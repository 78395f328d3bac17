# CONFIG for ../shared/nixos-eval/eval.sh: the one-host VM test's node (nodes.nix `machine`, with
# NIXEVAL_NODE=machine, and Alertmanager's options declared: alertmanager.nix), on private ports,
# for .ci/nixos-box: its systemd-box shares this machine's network, where RabbitMQ (5672, 15692
# once .ci/observability enabled its metrics, 25672) and PostgreSQL (5432) already listen.
# Option sources:
#   services.rabbitmq.port               nixos/modules/services/amqp/rabbitmq.nix
#   services.postgresql.settings.port    nixos/modules/services/databases/postgresql.nix
#   services.prometheus.port             nixos/modules/services/monitoring/prometheus/default.nix
#   services.prometheus.alertmanager.port  nixos/modules/services/monitoring/prometheus/alertmanager.nix
#   services.prometheus.exporters.*.port   nixos/modules/services/monitoring/prometheus/exporters.nix
{
  imports = [
    ./alertmanager.nix
    ./exporters-options.nix
  ];
  services.rabbitmq.port = 5682;
  services.postgresql.settings.port = 5442;
  services.prometheus.port = 9092;
  services.prometheus.alertmanager.port = 9193;
  services.prometheus.exporters.node.port = 9190;
  services.prometheus.exporters.postgres.port = 9197;
  services.sistema-mensajes = {
    stack.rabbitmq.metrics.port = 15682;
    producer.metrics.port = 9111;
    consumer.metrics.port = 9112;
  };
}
