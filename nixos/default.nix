# Everything: both daemons and the stack they run on (each part off until enabled).
{
  imports = [
    ./producer.nix
    ./consumer.nix
    ./stack.nix
  ];
}
