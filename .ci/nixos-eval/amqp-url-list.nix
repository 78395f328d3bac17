# CONFIG for eval.sh (NIXEVAL_NODE=consumer1): the consumer host of the split test with the nodes
# of a RabbitMQ cluster as a list (settings.amqp.url); each URL gets the TLS files.
{ lib, ... }:
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.settings.amqp.url = lib.mkForce [
    "amqps://sistema-consumer@rabbit1:5671/%2f"
    "amqps://sistema-consumer@rabbit2:5671/%2f?heartbeat=5"
  ];
}
