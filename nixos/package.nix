# The crate, built from Cargo.lock (no vendor hash to maintain), in two derivations, so that
# editing a dashboard, an alert rule, a socket unit or a drop-in rebuilds only the second, which
# copies files (the two .service files are also read by a test, so they rebuild both):
#   passthru.daemons  buildRustPackage, from only the files cargo reads: bin/{producer,consumer}
#   this package      bin/{producer,consumer}                               links to the daemons
#                     lib/systemd/system/{producer,consumer}.{service,socket}  systemd/ with store paths for /usr/local/bin
#                     share/sistema-mensajes/sql/                              the migrations
#                     share/sistema-mensajes/grafana/                          dashboards (and non-NixOS provisioning)
#                     share/sistema-mensajes/prometheus/{alerts,prometheus}.yml  rules and the non-NixOS scrape config
#                     share/sistema-mensajes/systemd/*.service.d/              the optional credentials drop-ins
#                                                                             (not under lib/: NixOS would apply them)
#
# buildRustPackage (pkgs/build-support/rust/build-rust-package/default.nix): `checkType` defaults
# to `buildType` ("release") and becomes `cargoCheckType`; the check hook
# (pkgs/build-support/rust/hooks/cargo-check-hook.sh) passes `--profile ${cargoCheckType}` unless it
# is "debug". In release, after the build, `cargo test` compiles most crates a second time,
# optimised, and links every test binary with Cargo.toml's fat LTO in one codegen unit; in debug
# it is a plain, unoptimised build, the one .ci/check-nix runs (without network, as the sandbox).
{
  lib,
  rustPlatform,
  stdenvNoCC,
}:
let
  cargo = lib.importTOML ../Cargo.toml;
  inherit (lib.fileset) difference toSource unions;

  # What cargo reads to build the crate and run the check phase's tests, and nothing else.
  crateFiles = unions [
    ../Cargo.toml
    ../Cargo.lock
    ../src
    # include_str! in src/db.rs; a unit test there lists the directory.
    ../sql
    # Cargo.toml declares [[bench]] pipeline: cargo refuses a manifest whose declared target is
    # missing, even for a build or a test.
    ../benches
    # The check phase runs them (all but those needing the servers, below). tests/fuzz is a
    # crate of its own, for cargo-fuzz.
    (difference ../tests ../tests/fuzz)
    # tests/cli.rs (shipped_units_leave_room_for_the_default_timeouts) reads their timeouts.
    ../systemd/producer.service
    ../systemd/consumer.service
  ];

  daemons = rustPlatform.buildRustPackage {
    pname = "${cargo.package.name}-daemons";
    inherit (cargo.package) version;

    src = toSource {
      root = ../.;
      fileset = crateFiles;
    };

    cargoLock.lockFile = ../Cargo.lock;

    # The tests in debug (see above): the release build is the installed one; the tests need no
    # LTO, and .ci/check-nix runs this very set, in debug.
    checkType = "debug";
    # The sandbox has no RabbitMQ or PostgreSQL: skip the tests that need them, by name
    # (docs/nixos.md, "Tests in the Nix build"). --exact: a name skips that test only, not every
    # test containing it.
    checkFlags = [
      "--exact"
    ]
    ++ lib.concatMap (name: [
      "--skip"
      name
    ]) (import ./integration-tests.nix { inherit lib; });

    meta = {
      description = "${cargo.package.description} (the daemons only)";
      license = lib.licenses.mit;
      mainProgram = "consumer";
      platforms = lib.platforms.linux;
    };
  };
in
stdenvNoCC.mkDerivation {
  pname = cargo.package.name;
  inherit (cargo.package) version;

  src = toSource {
    root = ../.;
    fileset = unions [
      ../systemd
      ../sql
      ../grafana
      ../nixos/prometheus/alerts.yml
      ../nixos/prometheus/prometheus.yml
    ];
  };

  dontConfigure = true;
  dontBuild = true;

  installPhase = ''
    runHook preInstall
    mkdir -p $out/bin
    ln -s ${daemons}/bin/producer ${daemons}/bin/consumer $out/bin/
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
    runHook postInstall
  '';

  passthru = { inherit daemons; };

  meta = {
    inherit (cargo.package) description;
    license = lib.licenses.mit;
    mainProgram = "consumer";
    platforms = lib.platforms.linux;
  };
}
