# Options and config shared by the other modules in this folder.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  top = config.services.sistema-mensajes;
in
{
  options.services.sistema-mensajes.package = lib.mkPackageOption pkgs "sistema-mensajes" {
    extraDescription = ''
      Both daemons, their systemd units, `sql/`, the Grafana dashboards and the Prometheus rules
      come from this package. The flake's modules default it to the flake's own package.
    '';
  };

  # The daemons' units come from their package: $out/lib/systemd/system/{producer,consumer}.*.
  # Listed once even when both daemons use the same package (NixOS links each package's units into
  # one directory, and some releases do not drop a package listed twice).
  config.systemd.packages = lib.unique (
    lib.concatMap (d: lib.optional (top.${d}.enable or false) top.${d}.package) [
      "producer"
      "consumer"
    ]
  );
}
