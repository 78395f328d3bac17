# Must fail: a secret given as a store path string ("${./file}" copies the file into the
# world-readable store, and the option gets its store path).
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.stack.rabbitmq.users.producer.passwordFile = "${./amqp.pw}";
}
