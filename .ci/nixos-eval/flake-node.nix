# CONFIG for eval.sh with flake-module.nix: the VM-test node $NIXEVAL_NODE, package left to the flake.
{
  imports = [ (import ../../nixos/tests/nodes.nix).${builtins.getEnv "NIXEVAL_NODE"} ];
  system.stateVersion = "26.05";
}
