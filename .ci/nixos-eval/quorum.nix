# CONFIG for eval.sh: the one-host node with a quorum queue (and a quorum dead-letter queue), for
# the delivery limit the provisioning unit sets as a policy (stack.rabbitmq.deliveryLimit).
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.settings.amqp = {
    queue_type = "quorum";
    dead_letter_queue_type = "quorum";
  };
}
