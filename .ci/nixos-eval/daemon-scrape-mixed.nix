# CONFIG for eval.sh that must fail: one job scraping this host's consumer and another host's with
# TLS and basic authentication (one scrape_config: one certificate name for both).
{
  imports = [ ./box-node-tls.nix ];
  services.sistema-mensajes.stack.prometheus.targets.consumer = [
    "127.0.0.1:9112"
    "consumer9:9102"
  ];
}
