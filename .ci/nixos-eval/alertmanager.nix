# CONFIG for eval.sh: the VM-test node $NIXEVAL_NODE (node.nix) with the options of NixOS's
# Alertmanager module declared (alertmanager-options.nix; ../shared/nixos-eval has no such module),
# with the pkgs it needs. NIXEVAL_ALERTMANAGER=receivers sets the receivers (URLs in the
# configuration, a webhook token and an SMTP password as files outside the store);
# NIXEVAL_ALERTMANAGER=url-files gives both URLs as files instead (`url_file`, Alertmanager >= 0.26).
{ lib, ... }:
let
  shared =
    let
      env = builtins.getEnv "NIXEVAL_SHARED";
    in
    if env != "" then env else toString ../../../shared;
  base = import "${shared}/nixos-eval/lib/pkgs.nix" { inherit lib; };
  variant = builtins.getEnv "NIXEVAL_ALERTMANAGER";
in
{
  imports = [
    ./node.nix
    ./alertmanager-options.nix
  ];
  _module.args.pkgs = lib.mkForce (
    base
    // {
      prometheus-alertmanager = base.nixevalStubs.mkPackage "prometheus-alertmanager";
      envsubst = base.nixevalStubs.mkPackage "envsubst";
    }
  );
  services.sistema-mensajes.stack.alertmanager = lib.mkMerge [
    (lib.mkIf (variant == "receivers") {
      heartbeat.url = "https://heartbeat.example.org/ping/check";
      webhook = {
        url = "https://alerts.example.org/alertmanager";
        tokenFile = "/run/secrets/webhook-token";
      };
      receiver.email_configs = [
        {
          to = "ops@example.org";
          from = "alertmanager@example.org";
          smarthost = "smtp.example.org:587";
          auth_username = "alertmanager@example.org";
          auth_password_file = "/run/credentials/alertmanager.service/smtp-password";
        }
      ];
      credentials.smtp-password = "/run/secrets/smtp-password";
    })
    (lib.mkIf (variant == "url-files") {
      heartbeat.urlFile = "/run/secrets/heartbeat-url";
      webhook = {
        urlFile = "/run/secrets/webhook-url";
        tokenFile = "/run/secrets/webhook-token";
      };
    })
  ];
}
