# MODULE for eval.sh: the flake's own nixosModules (which default the package to the flake's),
# with nixpkgs replaced by nixpkgs' lib and the evaluator's stand-in pkgs.
# NIXEVAL_SHARED: the shared/ folder (.ci/check-nix sets it). NIXEVAL_FLAKE_MODULES: which outputs,
# comma-separated (default: default), imported together as a user would.
let
  shared = builtins.getEnv "NIXEVAL_SHARED";
  lib = import (/. + "${shared}/third_party/nixpkgs-lib/lib");
  pkgs = import (/. + "${shared}/nixos-eval/lib/pkgs.nix") { inherit lib; };
  flake = import ../../flake.nix;
  self = flake.outputs {
    inherit self;
    nixpkgs = {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (_: pkgs);
    };
  };
  names = builtins.getEnv "NIXEVAL_FLAKE_MODULES";
in
{
  imports = map (n: self.nixosModules.${n}) (
    lib.splitString "," (if names == "" then "default" else names)
  );
}
