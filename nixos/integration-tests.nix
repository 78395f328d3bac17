# The names of the integration tests that need RabbitMQ or PostgreSQL: every #[tokio::test] in
# tests/*.rs (the synchronous ones there only run the binaries). The package's check phase skips
# them (`--exact --skip NAME`), since the build sandbox has neither server; the unit tests in src/
# and the other tests still run. New tests are picked up without editing this file.
{ lib }:
let
  dir = ../tests;
  files = lib.filter (lib.hasSuffix ".rs") (lib.attrNames (builtins.readDir dir));
  names =
    file:
    lib.pipe (builtins.readFile (dir + "/${file}")) [
      (builtins.split "#\\[tokio::test[^]\n]*][[:space:]]*async fn ([a-z0-9_]+)")
      (lib.filter lib.isList)
      (map lib.head)
    ];
in
lib.concatMap names files
