# Must fail: a secret given as a Nix path, which would copy it into the world-readable store.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.credentials.amqp-password = ./node.nix;
}
