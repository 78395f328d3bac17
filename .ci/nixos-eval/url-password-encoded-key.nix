# Must fail: `pass%77ord=` is `password=` once decoded, as tokio-postgres decodes query keys.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.settings.postgres.url =
    "postgres://weather_writer@db.example:5432/weather?pass%77ord=hunter2";
}
