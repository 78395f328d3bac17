# Declarations, for eval.sh, of the NixOS options of services.prometheus.exporters.{node,postgres}
# that the stack sets or reads, with nixpkgs' names, types and defaults, read in
# nixos/modules/services/monitoring/prometheus/exporters.nix (mkExporterOpts: enable
# mkEnableOption, port port, listenAddress str "0.0.0.0", extraFlags listOf str [ ], user and group
# str "<name>-exporter") and exporters/node.nix (port 9100), exporters/postgres.nix (port 9187,
# dataSourceName str "user=postgres database=postgres host=/run/postgresql sslmode=disable",
# runAsLocalSuperUser bool false). ../shared/nixos-eval has no exporter modules: what they make of
# these (prometheus-*-exporter.service) is not evaluated here; .ci/nixos-box runs stand-ins.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  exporter =
    name: port: extra:
    {
      enable = lib.mkEnableOption "the prometheus ${name} exporter";
      port = mkOption {
        type = types.port;
        default = port;
      };
      listenAddress = mkOption {
        type = types.str;
        default = "0.0.0.0";
      };
      extraFlags = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      user = mkOption {
        type = types.str;
        default = "${name}-exporter";
      };
      group = mkOption {
        type = types.str;
        default = "${name}-exporter";
      };
    }
    // extra;
in
{
  options.services.prometheus.exporters = {
    node = exporter "node" 9100 { };
    postgres = exporter "postgres" 9187 {
      dataSourceName = mkOption {
        type = types.str;
        default = "user=postgres database=postgres host=/run/postgresql sslmode=disable";
      };
      runAsLocalSuperUser = mkOption {
        type = types.bool;
        default = false;
      };
    };
  };
}
