# services.sistema-mensajes.<daemon>: one daemon, run from the package's own units.
#
# The units come from the package (`systemd.packages`: $out/lib/systemd/system/<daemon>.{service,socket},
# the files in systemd/ with store paths). This module adds only what a deployment needs, as a
# drop-in: the start command with the generated config, the metrics socket's address, credentials,
# the user, ordering against the local broker and database, and `wantedBy` (systemd.packages ignores
# [Install]). The hardening stays in systemd/<daemon>.service, the one place it is written.
{
  daemon,
  description,
  metricsPort,
  credentials,
  extraSettings ? _: { },
}:
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib) mkOption types;
  h = import ./lib.nix { inherit lib; };
  top = config.services.sistema-mensajes;
  cfg = top.${daemon};
  toml = pkgs.formats.toml { };
  listen = h.hostPort cfg.metrics.listenAddress cfg.metrics.port;
  configFile = toml.generate "${daemon}.toml" cfg.settings;
  str =
    default: text:
    mkOption {
      type = types.str;
      inherit default;
      description = text;
    };
  credentialFiles = lib.filterAttrs (_: file: file != null) cfg.credentials;
in
{
  imports = [ ./common.nix ];

  options.services.sistema-mensajes.${daemon} = {
    enable = lib.mkEnableOption description;

    package = mkOption {
      type = types.package;
      default = top.package;
      defaultText = lib.literalExpression "config.services.sistema-mensajes.package";
      description = "Package whose `bin/${daemon}` and `lib/systemd/system/${daemon}.*` units are used.";
    };

    user = str "sistema-${daemon}" ''
      Unix user the daemon runs as (a static system user, created here; the unit's
      `DynamicUser=yes` then uses it). Over PostgreSQL's Unix socket this is the name peer
      authentication sees.
    '';

    settings = mkOption {
      default = { };
      description = ''
        The daemon's configuration (README, "Configuration"), written to a TOML file in the store
        and passed with `--config`. Any key of the daemon's config may be set; the daemon rejects
        unknown ones (exit 78). No passwords here: see `credentials`. `metrics.listen` is set from
        `metrics.listenAddress` and `metrics.port`, so the socket and the config cannot disagree.
      '';
      example = lib.literalExpression ''{ amqp.prefetch = 500; log.level = "info"; }'';
      type = types.submodule {
        freeformType = toml.type;
        options = {
          amqp = {
            url = str "amqp://guest@127.0.0.1:5672/%2f" "Broker URI without the password.";
            exchange = str "weather" "Durable direct exchange readings are published to.";
            routing_key = str "weather_key" "Routing key of the readings.";
            queue = str "weather_queue" "Durable queue the consumer reads.";
            dead_letter_exchange = str "weather_dead_letter" "Fanout exchange for rejected messages.";
            dead_letter_queue = str "weather_dead_letter" "Queue bound to the dead-letter exchange.";
          };
          log.format = mkOption {
            type = types.enum [
              "auto"
              "text"
              "json"
              "journald"
            ];
            default = "auto";
            description = "`auto` logs natively to the journal under systemd.";
          };
        }
        // extraSettings { inherit str; };
      };
    };

    metrics = {
      listenAddress = str "127.0.0.1" "Address of the `/metrics` socket (`${daemon}.socket`).";
      port = mkOption {
        type = types.port;
        default = metricsPort;
        description = "Port of the `/metrics` socket (`${daemon}.socket`).";
      };
      openFirewall = lib.mkEnableOption "the metrics port in the firewall, for a Prometheus on another host";
    };

    credentials = lib.mapAttrs (
      id: text:
      h.secretFile ''
        File holding ${text}, handed to the daemon as the systemd credential `${id}`
        (`LoadCredential=`), which it reads from `$CREDENTIALS_DIRECTORY`. Null: no
        `LoadCredential=` line at all (a missing file would stop the unit from starting).
      ''
    ) credentials;
  };

  config = lib.mkIf cfg.enable {
    services.sistema-mensajes.${daemon}.settings.metrics.listen = listen;

    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.user;
      description = "sistema-mensajes ${daemon}";
    };
    users.groups.${cfg.user} = { };

    # The package's $out/lib/systemd/system/${daemon}.{service,socket} (systemd.packages, set in
    # common.nix); what follows becomes their drop-ins.
    systemd.sockets.${daemon} = {
      wantedBy = [ "sockets.target" ];
      # "" resets the package unit's ListenStream=127.0.0.1:<port>.
      listenStreams = [
        ""
        listen
      ];
    };

    systemd.services.${daemon} = {
      wantedBy = [ "multi-user.target" ];
      # NixOS's unit names (the package's After= names Debian's, which do not exist here).
      wants =
        lib.optional config.services.rabbitmq.enable "rabbitmq.service"
        ++ lib.optional (daemon == "consumer" && config.services.postgresql.enable) "postgresql.target";
      after =
        lib.optional config.services.rabbitmq.enable "rabbitmq.service"
        ++ lib.optional (daemon == "consumer" && config.services.postgresql.enable) "postgresql.target";
      restartTriggers = [ configFile ];
      serviceConfig = {
        # "" resets the package unit's ExecStart (which reads /etc/sistema-mensajes/${daemon}.toml).
        ExecStart = [
          ""
          (utils.escapeSystemdExecArgs [
            (lib.getExe' cfg.package daemon)
            "--config"
            configFile
          ])
        ];
        User = cfg.user;
        Group = cfg.user;
        LoadCredential = lib.mkIf (credentialFiles != { }) (
          lib.mapAttrsToList (id: file: "${id}:${file}") credentialFiles
        );
      };
    };

    networking.firewall.allowedTCPPorts = lib.optional cfg.metrics.openFirewall cfg.metrics.port;
  };
}
