# Must fail: a database password as a `password=` query parameter (libpq reads one there), which
# would land in the TOML in the store.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.settings.postgres.url =
    "postgres://weather_writer@db.example:5432/weather?sslmode=require&password=hunter2";
}
