# services.sistema-mensajes.stack: what the daemons run on, provisioned for them. `stack.enable`
# turns on every part on this host; each part can be turned off to use an existing server, and
# the parts can be spread over hosts (README, "NixOS").
#
# nixpkgs options set here, with the file that declares them. Written for nixos-26.05 (flake.lock);
# checked by evaluation against verbatim copies of these files from a 26.11-era nixpkgs
# (../shared/nixos-eval/upstream, Swarsel/nixpkgs@4aa6836a; the 26.05 files could not be read here):
#   services.rabbitmq.{enable,listenAddress,plugins,configItems}  nixos/modules/services/amqp/rabbitmq.nix
#   services.postgresql.{enable,enableTCPIP,ensureDatabases,ensureUsers,identMap,authentication}
#                                                     nixos/modules/services/databases/postgresql.nix
#   services.prometheus.{enable,globalConfig,scrapeConfigs,ruleFiles}
#                                                     nixos/modules/services/monitoring/prometheus/default.nix
#   services.grafana.{enable,settings.security.{admin_password,secret_key},provision.*}
#                                                     nixos/modules/services/monitoring/grafana.nix
#   systemd.services.*, users.*, networking.firewall.allowedTCPPorts  (nixos/lib/systemd-unit-options.nix,
#     nixos/modules/config/users-groups.nix, nixos/modules/services/networking/firewall.nix)
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib) mkDefault mkOption types;
  h = import ./lib.nix { inherit lib; };
  top = config.services.sistema-mensajes;
  cfg = top.stack;
  share = "${top.package}/share/sistema-mensajes";
  names = top.consumer.settings.amqp;
  topologyKeys = [
    "exchange"
    "routing_key"
    "queue"
    "dead_letter_exchange"
    "dead_letter_queue"
  ];
  amqpPort = config.services.rabbitmq.port;
  rabbitmqMetricsPort = 15692;

  enableOption =
    what:
    mkOption {
      type = types.bool;
      default = cfg.enable;
      defaultText = lib.literalExpression "config.services.sistema-mensajes.stack.enable";
      description = "Whether to run and provision ${what} on this host.";
    };

  # --- RabbitMQ -------------------------------------------------------------------------------
  rmq = cfg.rabbitmq;
  passwordFile =
    d:
    if rmq.users.${d}.passwordFile != null then
      rmq.users.${d}.passwordFile
    else
      "/var/lib/sistema-mensajes-rabbitmq/${d}.password";
  provisionUnit = "sistema-mensajes-rabbitmq-provision.service";

  # --- PostgreSQL -----------------------------------------------------------------------------
  pg = cfg.postgresql;
  localSocketUrl = "postgres:///${pg.database}?host=/run/postgresql&user=${pg.database}";

  # --- Prometheus -----------------------------------------------------------------------------
  job =
    name: targets: extra:
    lib.optional (targets != [ ]) (
      {
        job_name = name;
        static_configs = [ { inherit targets; } ];
      }
      // extra
    );
  localTarget =
    d: lib.optional top.${d}.enable (h.hostPort top.${d}.metrics.listenAddress top.${d}.metrics.port);
in
{
  imports = [
    ./producer.nix
    ./consumer.nix
  ];

  options.services.sistema-mensajes.stack = {
    enable = lib.mkEnableOption ''
      the whole stack on this host: RabbitMQ, PostgreSQL, Prometheus and Grafana, provisioned for
      sistema-mensajes, with the daemons that are enabled here wired to them'';

    rabbitmq = {
      enable = enableOption "RabbitMQ (with rabbitmq_prometheus and per-queue metrics, one user per daemon, no guest)";
      listenAddress = mkOption {
        type = types.str;
        default = "127.0.0.1";
        description = "Address RabbitMQ listens on for AMQP (`services.rabbitmq.listenAddress`); `0.0.0.0` for every IPv4 interface.";
      };
      openFirewall = lib.mkEnableOption "the AMQP port and the metrics port (15692) in the firewall, for daemons and a Prometheus on other hosts";
      users = lib.genAttrs [ "producer" "consumer" ] (d: {
        name = mkOption {
          type = types.str;
          default = "sistema-${d}";
          description = "Broker user of the ${d}.";
        };
        passwordFile = h.secretFile ''
          File with the ${d}'s broker password (the same file, or a copy, goes to the ${d}'s host as
          `services.sistema-mensajes.${d}.credentials.amqp-password`). Null: a random one is
          generated at first boot in /var/lib/sistema-mensajes-rabbitmq/${d}.password.
        '';
      });
    };

    postgresql = {
      enable = enableOption "PostgreSQL with the database, its owner role and a read-only role for Grafana";
      database = mkOption {
        type = types.str;
        default = "weather";
        description = ''
          Database, and the role that owns it (nixpkgs' `ensureDBOwnership` wants the same name). A
          consumer on this host reaches it over the Unix socket with peer authentication: no password.
        '';
      };
      readerRole = mkOption {
        type = types.str;
        default = "weather_reader";
        description = "Role Grafana reads with: it may only SELECT from `weather_logs`.";
      };
      tcp = {
        enable = lib.mkEnableOption "password logins over TCP for consumers on other hosts (scram-sha-256)";
        passwordFile = h.secretFile "File with the database role's password; the consumers get the same as `credentials.postgres-password`.";
        allowFrom = mkOption {
          type = types.listOf types.str;
          default = [
            "0.0.0.0/0"
            "::/0"
          ];
          description = "Networks (pg_hba.conf addresses) the consumers connect from.";
        };
        openFirewall = lib.mkEnableOption "PostgreSQL's port in the firewall";
      };
    };

    prometheus = {
      enable = enableOption "Prometheus, scraping both daemons, RabbitMQ and itself, with the pipeline's alert rules";
      targets =
        lib.mapAttrs
          (
            name: default:
            mkOption {
              type = types.listOf types.str;
              inherit default;
              defaultText = lib.literalMD "the ${name} on this host, if enabled here";
              description = "`host:port` scraped by the job `${name}`.";
            }
          )
          {
            producer = localTarget "producer";
            consumer = localTarget "consumer";
            rabbitmq = lib.optional rmq.enable "127.0.0.1:${toString rabbitmqMetricsPort}";
          };
    };

    grafana = {
      enable = enableOption "Grafana with the Prometheus and PostgreSQL datasources and the pipeline's dashboards";
      adminPasswordFile = h.secretFile "File with the Grafana `admin` password (required).";
      secretKeyFile = h.secretFile "File with Grafana's `secret_key` (required: nixpkgs no longer has a default), e.g. from `openssl rand -hex 32`.";
      prometheusUrl = mkOption {
        type = types.str;
        default = "http://127.0.0.1:${toString config.services.prometheus.port}";
        defaultText = lib.literalExpression ''"http://127.0.0.1:''${toString config.services.prometheus.port}"'';
        description = "URL of the Prometheus datasource (`uid` sistema-prometheus).";
      };
    };
  };

  config = lib.mkMerge [
    (lib.mkIf cfg.enable {
      assertions = [
        {
          assertion =
            let
              topology = d: lib.getAttrs topologyKeys top.${d}.settings.amqp;
            in
            !(top.producer.enable && top.consumer.enable) || topology "producer" == topology "consumer";
          message = "services.sistema-mensajes: the producer and the consumer on this host name different exchanges or queues.";
        }
      ];
    })

    # --- RabbitMQ ---------------------------------------------------------------------------
    (lib.mkIf rmq.enable {
      # nixos/modules/services/amqp/rabbitmq.nix
      services.rabbitmq = {
        enable = true;
        inherit (rmq) listenAddress;
        # rabbitmq.nix: configItems is attrsOf str.
        plugins = [ "rabbitmq_prometheus" ];
        configItems = {
          "prometheus.tcp.port" = toString rabbitmqMetricsPort;
          # Per-queue figures on /metrics itself, alarms included (/metrics/per-object has none).
          "prometheus.return_per_object_metrics" = "true";
          # A reading is a few hundred bytes; RabbitMQ's default allows 128 MiB a message, which a
          # consumer must hold in memory whole before it can even reject it (README, "Memory").
          "max_message_size" = toString (1024 * 1024);
        };
      };

      systemd.services.sistema-mensajes-rabbitmq-provision = {
        description = "sistema-mensajes: RabbitMQ users for the daemons";
        wantedBy = [ "multi-user.target" ];
        requires = [ "rabbitmq.service" ];
        after = [ "rabbitmq.service" ];
        path = [
          config.services.rabbitmq.package
          pkgs.coreutils
          pkgs.gnugrep
          pkgs.gnused
        ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          # rabbitmqctl authenticates with the Erlang cookie in rabbitmq's home (its dataDir).
          User = "rabbitmq";
          Group = "rabbitmq";
          StateDirectory = "sistema-mensajes-rabbitmq";
          StateDirectoryMode = "0700";
          UMask = "0077";
          ExecStart = utils.escapeSystemdExecArgs (
            [
              "${pkgs.bash}/bin/bash"
              ./rabbitmq-provision.sh
              "--generate"
              "--delete-guest"
              "--exchange"
              names.exchange
              "--queue"
              names.queue
              "--dead-letter-exchange"
              names.dead_letter_exchange
              "--dead-letter-queue"
              names.dead_letter_queue
            ]
            ++ map (d: "${d}:${rmq.users.${d}.name}:${passwordFile d}") [
              "producer"
              "consumer"
            ]
          );
        };
      };

      networking.firewall.allowedTCPPorts = lib.optionals rmq.openFirewall [
        amqpPort
        rabbitmqMetricsPort
      ];

    })

    # Daemons on this host and the broker: our user, its password, after the users exist.
    (lib.mkIf rmq.enable {
      services.sistema-mensajes = lib.genAttrs [ "producer" "consumer" ] (d: {
        settings.amqp.url = mkDefault "amqp://${rmq.users.${d}.name}@127.0.0.1:${toString amqpPort}/%2f";
        credentials.amqp-password = mkDefault (passwordFile d);
      });
      systemd.services = lib.genAttrs [ "producer" "consumer" ] (
        d:
        lib.mkIf top.${d}.enable {
          wants = [ provisionUnit ];
          after = [ provisionUnit ];
        }
      );
    })

    # --- PostgreSQL -------------------------------------------------------------------------
    (lib.mkIf pg.enable {
      # nixos/modules/services/databases/postgresql.nix
      services.postgresql = {
        enable = true;
        enableTCPIP = pg.tcp.enable;
        ensureDatabases = [ pg.database ];
        ensureUsers = [
          {
            name = pg.database;
            ensureDBOwnership = true;
          }
          { name = pg.readerRole; }
        ];
        # Peer authentication over the Unix socket, mapped: the consumer's Unix user logs in as the
        # database's owner, Grafana's as the read-only role. Inserted above nixpkgs' defaults.
        identMap = ''
          sistema-mensajes ${top.consumer.user} ${pg.database}
          sistema-mensajes grafana ${pg.readerRole}
        '';
        authentication = ''
          local ${pg.database} ${pg.database} peer map=sistema-mensajes
          local ${pg.database} ${pg.readerRole} peer map=sistema-mensajes
        ''
        + lib.optionalString pg.tcp.enable (
          lib.concatMapStrings (
            net: "host ${pg.database} ${pg.database} ${net} scram-sha-256\n"
          ) pg.tcp.allowFrom
        );
      };

      # The read-only role may read weather_logs once the consumer has created it (an event
      # trigger grants it then), and nothing else; the owner's password, for TCP logins.
      systemd.services.sistema-mensajes-postgresql-grants = {
        description = "sistema-mensajes: PostgreSQL grants for the read-only role";
        wantedBy = [ "multi-user.target" ];
        requires = [ "postgresql.target" ];
        after = [ "postgresql.target" ];
        path = [ config.services.postgresql.finalPackage ];
        script = ''
          psql -d ${lib.escapeShellArg pg.database} -v ON_ERROR_STOP=1 \
            -v owner=${lib.escapeShellArg pg.database} -v reader=${lib.escapeShellArg pg.readerRole} \
            -v schema=${lib.escapeShellArg top.consumer.settings.postgres.schema} \
            -f ${./postgresql-grants.sql}
        ''
        + lib.optionalString (pg.tcp.passwordFile != null) ''
          psql -d ${lib.escapeShellArg pg.database} -v ON_ERROR_STOP=1 -v owner=${lib.escapeShellArg pg.database} <<'SQL'
          \set password `cat "$CREDENTIALS_DIRECTORY/owner-password"`
          ALTER ROLE :"owner" PASSWORD :'password';
          SQL
        '';
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          User = "postgres";
          Group = "postgres";
          LoadCredential = lib.mkIf (pg.tcp.passwordFile != null) [ "owner-password:${pg.tcp.passwordFile}" ];
        };
      };

      networking.firewall.allowedTCPPorts = lib.optional pg.tcp.openFirewall config.services.postgresql.settings.port;

      services.sistema-mensajes.consumer.settings.postgres.url = mkDefault localSocketUrl;
    })

    # --- Prometheus -------------------------------------------------------------------------
    (lib.mkIf cfg.prometheus.enable {
      # nixos/modules/services/monitoring/prometheus/default.nix
      services.prometheus = {
        enable = true;
        globalConfig.scrape_interval = mkDefault "15s";
        scrapeConfigs =
          job "producer" cfg.prometheus.targets.producer { }
          ++ job "consumer" cfg.prometheus.targets.consumer { }
          # Same as nixos/prometheus/prometheus.yml, whose metric names the dashboards and alerts
          # use: per-queue depth and consumers from /metrics/detailed (rabbitmq_detailed_*).
          # prometheus/default.nix: scrape_config.params is attrsOf (listOf str).
          ++ job "rabbitmq" cfg.prometheus.targets.rabbitmq {
            metrics_path = "/metrics/detailed";
            params = {
              family = [
                "queue_coarse_metrics"
                "queue_consumer_count"
              ];
              vhost = [ "/" ];
            };
          }
          ++ job "prometheus" [ "127.0.0.1:${toString config.services.prometheus.port}" ] { };
        # nixos/prometheus/alerts.yml, checked by promtool when the system is built.
        ruleFiles = [ "${share}/prometheus/alerts.yml" ];
      };
    })

    # --- Grafana ----------------------------------------------------------------------------
    (lib.mkIf cfg.grafana.enable {
      assertions = [
        {
          assertion = cfg.grafana.adminPasswordFile != null && cfg.grafana.secretKeyFile != null;
          message = "services.sistema-mensajes.stack.grafana: set adminPasswordFile and secretKeyFile.";
        }
      ];

      # nixos/modules/services/monitoring/grafana.nix
      services.grafana = {
        enable = true;
        settings.security = {
          # Grafana's file provider, reading the credentials below at start.
          admin_password = "$__file{/run/credentials/grafana.service/admin-password}";
          secret_key = "$__file{/run/credentials/grafana.service/secret-key}";
        };
        provision = {
          enable = true;
          datasources.settings = {
            apiVersion = 1;
            datasources = [
              {
                name = "Prometheus";
                type = "prometheus";
                uid = "sistema-prometheus";
                access = "proxy";
                url = cfg.grafana.prometheusUrl;
                isDefault = true;
              }
              {
                name = "PostgreSQL (weather_logs)";
                type = "grafana-postgresql-datasource";
                uid = "sistema-postgres";
                # The Unix socket's directory (a URL starting with "/" is a socket for Grafana:
                # pkg/tsdb/grafana-postgresql-datasource/connection_string.go): peer
                # authentication as the read-only role, no password.
                url = "/run/postgresql";
                user = pg.readerRole;
                jsonData = {
                  database = pg.database;
                  sslmode = "disable";
                };
              }
            ];
          };
          dashboards.settings = {
            apiVersion = 1;
            providers = [
              {
                name = "sistema-mensajes";
                type = "file";
                options.path = "${share}/grafana/dashboards";
              }
            ];
          };
        };
      };

      # grafana.service is grafana.nix's unit; LoadCredential= added to it.
      systemd.services.grafana = {
        after = lib.optional pg.enable "postgresql.target";
        serviceConfig.LoadCredential = [
          "admin-password:${toString cfg.grafana.adminPasswordFile}"
          "secret-key:${toString cfg.grafana.secretKeyFile}"
        ];
      };
    })
  ];
}
