# Must fail: a port given as a string.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.metrics.port = "9102";
}
