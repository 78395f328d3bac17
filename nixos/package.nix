# The crate, built from Cargo.lock (no vendor hash to maintain). Installs:
#   bin/{producer,consumer}
#   lib/systemd/system/{producer,consumer}.{service,socket}  systemd/ with store paths for /usr/local/bin
#   share/sistema-mensajes/sql/                              the migrations
#   share/sistema-mensajes/grafana/                          dashboards (and non-NixOS provisioning)
#   share/sistema-mensajes/prometheus/{alerts,prometheus}.yml  rules and the non-NixOS scrape config
#   share/sistema-mensajes/systemd/*.service.d/              the optional credentials drop-ins
#                                                           (not under lib/: NixOS would apply them)
{ lib, rustPlatform }:
let
  cargo = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = cargo.package.name;
  inherit (cargo.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../tests
      ../benches
      ../sql
      ../systemd
      ../grafana
      ../nixos/prometheus
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  # The sandbox has no RabbitMQ or PostgreSQL: skip the tests that need them, by name (README,
  # "NixOS"). --exact: a name skips that test only, not every test containing it.
  checkFlags = [
    "--exact"
  ]
  ++ lib.concatMap (name: [
    "--skip"
    name
  ]) (import ./integration-tests.nix { inherit lib; });

  postInstall = ''
    share=$out/share/sistema-mensajes
    for unit in systemd/*.service systemd/*.socket; do
      install -Dm444 "$unit" "$out/lib/systemd/system/$(basename "$unit")"
    done
    substituteInPlace $out/lib/systemd/system/*.service --replace-fail /usr/local/bin/ "$out/bin/"
    for d in systemd/*.service.d; do
      install -Dm444 -t "$share/systemd/$(basename "$d")" "$d"/*
    done
    install -Dm444 -t $share/sql sql/*.sql
    mkdir -p $share/grafana
    cp -r grafana/. $share/grafana/
    install -Dm444 -t $share/prometheus nixos/prometheus/alerts.yml nixos/prometheus/prometheus.yml
  '';

  meta = {
    description = cargo.package.description;
    license = lib.licenses.mit;
    mainProgram = "consumer";
    platforms = lib.platforms.linux;
  };
}
