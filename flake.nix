{
  description = "sistema-mensajes: weather readings from RabbitMQ into PostgreSQL, exactly once";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The modules, with the package defaulting to this flake's own build (no overlay needed,
      # which also keeps `nixpkgs.*` untouched for runNixOSTest's read-only pkgs).
      withPackage = module: {
        imports = [
          module
          packageDefault
        ];
      };
      # One module, with a key, so that importing several of the outputs (producer with consumer,
      # default with stack) sets the default once instead of twice at the same priority.
      packageDefault =
        { pkgs, ... }:
        {
          key = "sistema-mensajes-flake-package-default";
          services.sistema-mensajes.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
    in
    {
      overlays.default = final: _prev: {
        sistema-mensajes = final.callPackage ./nixos/package.nix { };
      };

      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nixos/package.nix { };
        # `nix run .#demo [N]`: scripts/demo with this flake's daemons, and this flake's RabbitMQ
        # and PostgreSQL where none answer on 127.0.0.1:5672 and :5432 (started as the calling
        # user, in a temporary directory, and removed afterwards).
        demo = pkgs.writeShellApplication {
          name = "sistema-mensajes-demo";
          runtimeInputs = [
            pkgs.rabbitmq-server
            pkgs.postgresql
            pkgs.curl
            pkgs.coreutils
            pkgs.gawk
            pkgs.gnugrep
            pkgs.gnused
          ];
          text = ''
            export DEMO_BIN=${self.packages.${pkgs.stdenv.hostPlatform.system}.default}/bin
            exec ${self}/scripts/demo "$@"
          '';
          meta.description = "Both daemons against local RabbitMQ and PostgreSQL; prints the rows stored";
        };
      });

      apps = forAllSystems (pkgs: {
        demo = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.demo;
          meta.description = self.packages.${pkgs.stdenv.hostPlatform.system}.demo.meta.description;
        };
      });

      nixosModules = {
        default = withPackage ./nixos;
        producer = withPackage ./nixos/producer.nix;
        consumer = withPackage ./nixos/consumer.nix;
        stack = withPackage ./nixos/stack.nix;
      };

      # The VM tests need KVM (nix flake check on a builder with the nixos-test feature).
      checks = forAllSystems (
        pkgs:
        let
          vmTest =
            file:
            pkgs.testers.runNixOSTest {
              imports = [ file ];
              defaults.imports = [ self.nixosModules.default ];
            };
        in
        {
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          vm-one-host = vmTest ./nixos/tests/one-host.nix;
          vm-split = vmTest ./nixos/tests/split.nix;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default.daemons ];
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            pkgs.rabbitmq-server
            pkgs.postgresql
            pkgs.prometheus.cli # promtool
            pkgs.prometheus-alertmanager # amtool, .ci/alerts-e2e
            pkgs.nixfmt
            pkgs.deadnix
            pkgs.jq
            pkgs.curl
            (pkgs.python3.withPackages (ps: [ ps.pika ])) # the CI scripts' independent AMQP client
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
