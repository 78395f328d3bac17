# CONFIG for eval.sh that must fail: a certificate for the stack without its key.
{
  imports = [ ./node.nix ];
  services.sistema-mensajes.stack.tls = {
    caFile = "/run/secrets/ca.pem";
    certFile = "/run/secrets/backend.pem";
  };
}
