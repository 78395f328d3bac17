# Options shared by the other modules in this folder: the package both daemons default to.
{ lib, pkgs, ... }:
{
  options.services.sistema-mensajes.package = lib.mkPackageOption pkgs "sistema-mensajes" {
    extraDescription = ''
      Both daemons, their systemd units, `sql/`, the Grafana dashboards and the Prometheus rules
      come from this package. The flake's modules default it to the flake's own package.
    '';
  };
}
