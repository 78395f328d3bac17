# CONFIG for eval.sh that must fail: the broker's CA named in the URL and given as a credential.
{ lib, ... }:
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.consumer = {
    settings.amqp.url = lib.mkForce "amqps://broker.example:5671/%2f?cacertfile=/etc/ssl/ca.pem";
    credentials.amqp-tls-ca = "/run/secrets/ca.pem";
  };
}
