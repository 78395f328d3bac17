# CONFIG for eval.sh that must fail: a CA for the broker, but a plain `amqp://` URL.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.credentials.amqp-tls-ca = "/run/secrets/ca.pem";
}
