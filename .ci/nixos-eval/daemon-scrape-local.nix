# CONFIG for eval.sh that must fail: the stack's scrapes of the daemons over TLS, on a host whose own
# daemons are scraped at 127.0.0.1 (not supported yet).
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.stack.prometheus.daemonScrape.caFile = "/run/secrets/ca.pem";
}
