# Must fail: the stack's Grafana without its admin password and secret_key files.
{ lib, ... }:
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.stack.grafana = {
    adminPasswordFile = lib.mkForce null;
    secretKeyFile = lib.mkForce null;
  };
}
