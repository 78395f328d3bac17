# Helpers for the modules in this folder (not a module).
{ lib }:
rec {
  # A secret's path. A string, not a Nix path: a path literal would be copied into the
  # world-readable store. systemd reads the file at start (LoadCredential=), so it may be
  # readable by root only.
  secretPath = lib.types.strMatching "/.+" // {
    description = "absolute path of a file read at runtime (never copied to the Nix store)";
  };

  # An optional secret file option (null: not set).
  secretFile =
    description:
    lib.mkOption {
      type = lib.types.nullOr secretPath;
      default = null;
      example = "/run/secrets/example";
      inherit description;
    };

  # host:port as both systemd's ListenStream= and the daemons' `metrics.listen` parse it.
  hostPort =
    address: port:
    if lib.hasInfix ":" address then "[${address}]:${toString port}" else "${address}:${toString port}";
}
