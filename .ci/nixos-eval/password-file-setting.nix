# CONFIG for eval.sh, on node consumer1: passwords given as `*password_file` settings, as a
# secrets manager leaves them (root-only files). They must reach the unit as credentials
# (LoadCredential=, read by PID 1), not as paths the daemon's user would have to read.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer.settings = {
    amqp.password_file = "/run/secrets/amqp";
    postgres.owner_password_file = "/run/secrets/owner";
  };
}
