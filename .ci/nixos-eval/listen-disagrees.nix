# Must fail: a metrics.listen in the settings that is not the socket's address.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.settings.metrics.listen = "127.0.0.1:9999";
}
