# services.sistema-mensajes.consumer: stores the readings from RabbitMQ in PostgreSQL.
import ./daemon.nix {
  daemon = "consumer";
  description = "the sistema-mensajes consumer (readings from RabbitMQ into PostgreSQL)";
  metricsPort = 9102;
  credentials = {
    amqp-password = "the broker password";
    postgres-password = "the database password (none with peer authentication over the Unix socket)";
    postgres-tls-ca = "the CA that signed PostgreSQL's certificate (PEM; `sslrootcert=` is added to `settings.postgres.url`; give `sslmode=verify-full` there)";
    postgres-tls-cert = "a client certificate for PostgreSQL's `cert` authentication (PEM; `sslcert=`)";
    postgres-tls-key = "the client certificate's key (PEM, unencrypted; `sslkey=`)";
  };
  connectsTo = [
    "amqp"
    "postgres"
  ];
  extraSettings =
    {
      str,
      url,
      optionalUrl,
      optionalStr,
      secret,
      bool,
    }:
    {
      postgres = {
        url = url "postgres://postgres@127.0.0.1:5432/postgres" "Database URL without the password (one in it fails evaluation: this file is in the world-readable store); `postgres:///weather?host=/run/postgresql&user=weather` for the Unix socket. Its user is the consumer's role.";
        password_file = secret "File with the database password. Handed to the daemon as the credential `postgres-password` (`LoadCredential=`, so it may be readable by root only), preferred to `credentials.postgres-password`.";
        schema = str "public" "Schema of `weather_logs`, created if missing.";
        migrate = bool true ''
          Whether the consumer applies pending migrations at start, as its own role (which must then
          own the schema). False: it only checks that they were applied, and waits until they are
          (`consumer migrate` applies them as the owner). The stack sets it to false.
        '';
        owner_url = optionalUrl "URL (without the password) of the role `consumer migrate` connects as, which owns the schema and grants the consumer's role what it needs. Null: `postgres.url`.";
        retention = optionalStr "How long readings are kept, by `measured_at` (`\"400d\"`, at least a day): `consumer maintain` (the stack's hourly `sistema-mensajes-postgresql-maintain.timer`) drops each daily partition of `weather_logs` once its whole day is older. Null: kept for ever.";
        owner_password_file = secret "File with the owner's password for `consumer migrate`. Handed over as the credential `postgres-owner-password` (`LoadCredential=`, so it may be readable by root only).";
      };
    };
}
