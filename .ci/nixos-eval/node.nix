# CONFIG for ../shared/nixos-eval/eval.sh: the VM-test node named by $NIXEVAL_NODE
# (nixos/tests/nodes.nix), with the evaluator's stand-in package.
{ pkgs, ... }:
let
  node = builtins.getEnv "NIXEVAL_NODE";
  nodes = import ../../nixos/tests/nodes.nix;
in
{
  imports = [
    (nodes.${node} or (throw "NIXEVAL_NODE=${node} is not a node of nixos/tests/nodes.nix"))
  ];
  system.stateVersion = "26.05";
  networking.hostName = node;
  services.sistema-mensajes.package = pkgs.nixevalStubs.mkPackage "sistema-mensajes";
}
