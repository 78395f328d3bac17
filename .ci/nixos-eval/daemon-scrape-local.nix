# CONFIG for eval.sh that must fail: the stack's scrapes of the daemons over https, while this
# host's own daemons (node.nix `machine`) serve /metrics in plain http.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.stack.prometheus.daemonScrape.caFile = "/run/secrets/ca.pem";
}
