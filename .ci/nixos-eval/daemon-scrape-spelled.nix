# CONFIG for eval.sh that must fail: as daemon-scrape-local.nix, with this host's daemons named
# `localhost` in their jobs' targets instead of the default 127.0.0.1 (a spelling must not slip
# past the check).
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.stack.prometheus = {
    daemonScrape.caFile = "/run/secrets/ca.pem";
    targets.producer = [ "localhost:9101" ];
    targets.consumer = [ "localhost:9102" ];
  };
}
