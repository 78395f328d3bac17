# Must fail: a broker password in the URL, which would land in the TOML in the store.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.producer.settings.amqp.url =
    "amqp://sistema-producer:hunter2@127.0.0.1:5672/%2f";
}
