# MODULE for eval.sh: the flake's own nixosModules.default (which defaults the package to the
# flake's), with nixpkgs replaced by nixpkgs' lib and the evaluator's stand-in pkgs.
# NIXEVAL_SHARED: the shared/ folder (.ci/check-nix sets it).
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
in
self.nixosModules.default
