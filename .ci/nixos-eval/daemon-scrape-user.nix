# CONFIG for eval.sh that must fail: Prometheus would log in as a user this host's daemons do not
# have among their metrics.basicAuthUsers.
{ lib, ... }:
{
  imports = [ ./box-node-tls.nix ];
  services.sistema-mensajes.stack.prometheus.daemonScrape.username = lib.mkForce "grafana";
}
