# CONFIG for eval.sh that must fail: the broker's CA is given, and one URL of the list is plain
# amqp:// (that node would be reached in plain text).
{ lib, ... }:
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer = {
    settings.amqp.url = lib.mkForce [
      "amqps://sistema-consumer@rabbit1:5671/%2f"
      "amqp://sistema-consumer@rabbit2:5672/%2f"
    ];
    credentials.amqp-tls-ca = "/run/secrets/ca.pem";
  };
}
