# Must fail: PostgreSQL logins over TCP with no network listed (none is open by default).
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.stack.postgresql.tcp.enable = true;
}
