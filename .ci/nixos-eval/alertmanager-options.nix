# Declarations, for eval.sh, of the NixOS options of services.prometheus.alertmanager that the
# stack sets or reads, with nixpkgs' names, types and defaults (read in
# nixos/modules/services/monitoring/prometheus/alertmanager.nix: enable mkEnableOption,
# clusterPeers listOf str [ ], configuration nullOr attrs null, extraFlags listOf str [ ],
# listenAddress str "", port port 9093). ../shared/nixos-eval has no Alertmanager module; this file
# declares the options only, so the stack's Alertmanager part evaluates here. What the module
# makes of them (alertmanager.service, amtool at build time) is not evaluated here.
{ lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options.services.prometheus.alertmanager = {
    enable = lib.mkEnableOption "Prometheus Alertmanager";
    clusterPeers = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    configuration = mkOption {
      type = types.nullOr types.attrs;
      default = null;
    };
    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    listenAddress = mkOption {
      type = types.str;
      default = "";
    };
    port = mkOption {
      type = types.port;
      default = 9093;
    };
  };
}
