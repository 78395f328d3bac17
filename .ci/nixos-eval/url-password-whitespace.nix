# Must fail: a URL parser strips a leading space and a tab anywhere, so the daemon would read
# `user:password@` where an anchored pattern sees no URL at all.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.producer.settings.amqp.url =
    " am\tqp://sistema-producer:hunter2@127.0.0.1:5672/%2f";
}
