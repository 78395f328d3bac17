# Must fail: a misspelled option (metrics.prot for metrics.port).
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.metrics.prot = 9102;
}
