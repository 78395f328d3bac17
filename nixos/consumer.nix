# services.sistema-mensajes.consumer: stores the readings from RabbitMQ in PostgreSQL.
import ./daemon.nix {
  daemon = "consumer";
  description = "the sistema-mensajes consumer (readings from RabbitMQ into PostgreSQL)";
  metricsPort = 9102;
  credentials = {
    amqp-password = "the broker password";
    postgres-password = "the database password (none with peer authentication over the Unix socket)";
  };
  extraSettings =
    { str }:
    {
      postgres = {
        url = str "postgres://postgres@127.0.0.1:5432/postgres" "Database URL without the password; `postgres:///weather?host=/run/postgresql&user=weather` for the Unix socket.";
        schema = str "public" "Schema of `weather_logs`, created if missing.";
      };
    };
}
