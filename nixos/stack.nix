# services.sistema-mensajes.stack: what the daemons run on, provisioned for them. `stack.enable`
# turns on every part on this host; each part can be turned off to use an existing server, and
# the parts can be spread over hosts (docs/nixos.md).
#
# Least privilege: each daemon has its own broker user, which may neither declare nor delete
# anything (`consumer declare-topology` does that once, as a separate topology user) and only
# publish or consume what it must; the consumer's database role may only insert readings (the
# database's owner applies migrations, in its own unit, as a Unix user the consumer cannot be);
# Grafana's role may only read them. Nothing listens beyond loopback unless an option says so.
#
# nixpkgs options set here, with the file that declares them. Written for nixos-26.05 (flake.lock);
# checked by evaluation against verbatim copies of these files from a 26.11-era nixpkgs
# (../shared/nixos-eval/upstream, Swarsel/nixpkgs@4aa6836a; the 26.05 files could not be read here):
#   services.rabbitmq.{enable,listenAddress,plugins,configItems}  nixos/modules/services/amqp/rabbitmq.nix
#   services.postgresql.{enable,enableTCPIP,ensureDatabases,ensureUsers,identMap,authentication}
#                                                     nixos/modules/services/databases/postgresql.nix
#   services.prometheus.{enable,listenAddress,port,globalConfig,scrapeConfigs,ruleFiles}
#                                                     nixos/modules/services/monitoring/prometheus/default.nix
#     (listenAddress: str, default "0.0.0.0", the host part of --web.listen-address; `port` beside it)
#   services.prometheus.alertmanagers                 (same file: listOf attrs, prometheus.yml's
#     `alerting.alertmanagers`)
#   services.prometheus.alertmanager.{enable,listenAddress,port,configuration}
#                                                     nixos/modules/services/monitoring/prometheus/alertmanager.nix
#     (read at Swarsel/nixpkgs@4aa6836a; its options are declared for the evaluator in .ci/nixos-eval/alertmanager-options.nix;
#     listenAddress: str, default "" = every interface; port: port, default 9093; configuration:
#     nullOr attrs, written with builtins.toJSON to the store, checked with `amtool check-config`
#     at build time (checkConfig, default true), then passed through envsubst in preStart, so a
#     literal `$` must be written `$$`; the unit is alertmanager.service, DynamicUser = true)
#   services.grafana.{enable,settings.security.{admin_password,secret_key},provision.*}
#                                                     nixos/modules/services/monitoring/grafana.nix
#   systemd.services.*, users.*, networking.firewall.allowedTCPPorts  (nixos/lib/systemd-unit-options.nix,
#     nixos/modules/config/users-groups.nix, nixos/modules/services/networking/firewall.nix)
{
  config,
  options,
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
  # The alert rules with the consumer's queue in their selectors and texts (they name the default,
  # weather_queue): a renamed amqp.queue keeps its alerts. Only a name PromQL and YAML take as it is.
  queueNameOk = builtins.match "[A-Za-z0-9_.:-]+" names.queue != null;
  alertRules =
    builtins.replaceStrings
      [ "weather_queue" "weather_dead_letter" ]
      [ names.queue names.dead_letter_queue ]
      (builtins.readFile ./prometheus/alerts.yml);
  toml = pkgs.formats.toml { };
  consumerExe = lib.getExe' top.consumer.package "consumer";
  topologyKeys = [
    "exchange"
    "routing_key"
    "queue"
    "dead_letter_exchange"
    "dead_letter_queue"
  ];
  amqpPort = config.services.rabbitmq.port;
  rabbitmqMetricsPort = rmq.metrics.port;

  enableOption =
    what:
    mkOption {
      type = types.bool;
      default = cfg.enable;
      defaultText = lib.literalExpression "config.services.sistema-mensajes.stack.enable";
      description = "Whether to run and provision ${what} on this host.";
    };

  # A host in a URL (IPv6 in brackets).
  urlHost = a: if lib.hasInfix ":" a then "[${a}]" else a;

  # The hardening of the oneshots that run our own binary (`consumer migrate`,
  # `consumer declare-topology`): the daemons' set (systemd/consumer.service), minus what only a
  # long-running notify service needs. Each unit adds its RestrictAddressFamilies= and IP lists;
  # .ci/check-nix rates them with systemd-analyze security.
  oneshotHardening = {
    CapabilityBoundingSet = [ "" ];
    AmbientCapabilities = [ "" ];
    DeviceAllow = [ "" ];
    DevicePolicy = "closed";
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    NoNewPrivileges = true;
    PrivateDevices = true;
    PrivateMounts = true;
    PrivateTmp = true;
    PrivateUsers = true;
    ProcSubset = "pid";
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHome = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectProc = "invisible";
    ProtectSystem = "strict";
    RemoveIPC = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
    SystemCallErrorNumber = "EPERM";
    UMask = "0077";
    # Exit 75 (EX_TEMPFAIL): the server could not be reached, try again. The daemons only Want=
    # these units and wait for what they do by themselves (passive declares, the migrations
    # check), so a failed attempt fails no daemon. 1 (a failed migration or declaration) and 78
    # (EX_CONFIG) are not retried.
    Restart = "on-failure";
    RestartSec = "5s";
    RestartPreventExitStatus = [
      "1"
      "78"
    ];
  };

  # --- RabbitMQ -------------------------------------------------------------------------------
  rmq = cfg.rabbitmq;
  roles = [
    "producer"
    "consumer"
    "topology"
  ];
  passwordFile =
    r:
    if rmq.users.${r}.passwordFile != null then
      rmq.users.${r}.passwordFile
    else
      "/var/lib/sistema-mensajes-rabbitmq/${r}.password";
  # The provisioning unit runs as rabbitmq, which cannot read a root-only secret (sops-nix, agenix):
  # a password given as a file reaches it as a credential (LoadCredential=: PID 1 reads the file);
  # a generated one stays in the unit's state directory, which rabbitmq owns.
  givenPassword = r: rmq.users.${r}.passwordFile != null;
  provisionCredential = r: "${r}-password";
  # ROLE:USER:PASSWORD_FILE for nixos/rabbitmq-provision.sh, quoted for ExecStart=. A given password
  # is the credential's copy, `%d/<id>`: `%d` is the unit's credentials directory, the value of
  # $CREDENTIALS_DIRECTORY (systemd.unit(5), "Specifiers"). utils.escapeSystemdExecArg
  # (nixos/lib/utils.nix: JSON-quoted, `%` and `$` doubled) would make it a literal `%%d`, so it is
  # appended after the rest is quoted.
  provisionSpec =
    r:
    let
      prefix = "${r}:${rmq.users.${r}.name}:";
    in
    if givenPassword r then
      lib.removeSuffix "\"" (utils.escapeSystemdExecArg prefix) + "%d/${provisionCredential r}\""
    else
      utils.escapeSystemdExecArg (prefix + passwordFile r);
  provisionUnit = "sistema-mensajes-rabbitmq-provision.service";
  topologyUnit = "sistema-mensajes-rabbitmq-topology.service";
  # Where this host reaches its own broker: with TLS, plain AMQP listens on loopback only.
  amqpHost = if tlsOn then "127.0.0.1" else h.connectAddress rmq.listenAddress;
  localAmqpUrl = user: "amqp://${user}@${urlHost amqpHost}:${toString amqpPort}/%2f";
  topologyAddresses = h.urlAddresses [ (localAmqpUrl rmq.users.topology.name) ];
  # `consumer declare-topology`'s settings: the consumer's topology (names, queue type and any
  # other declaration key), the topology user instead of the consumer's.
  topologyConfig = toml.generate "declare-topology.toml" cfg.rabbitmq.topologySettings;
  topologySettings = {
    amqp =
      removeAttrs names [
        "url"
        "password_file"
        "declare"
        "prefetch"
      ]
      // {
        url = localAmqpUrl rmq.users.topology.name;
      };
  };

  # --- TLS for the broker and the database ---------------------------------------------------
  # The files reach each server as credentials (LoadCredential=, read by PID 1: they may be root's),
  # and its configuration names the copies, /run/credentials/<unit>/<id> (a store file cannot use
  # systemd's %d). Research notes: rabbitmq.nix and postgresql.nix have no TLS options of their
  # own; RabbitMQ's keys are its schema's (listeners.ssl.*, ssl_options.*), PostgreSQL's its GUCs.
  tlsOn = cfg.tls.caFile != null && cfg.tls.certFile != null && cfg.tls.keyFile != null;
  tlsCredentials = [
    "tls-ca:${cfg.tls.caFile}"
    "tls-cert:${cfg.tls.certFile}"
    "tls-key:${cfg.tls.keyFile}"
  ];
  tlsPath = unit: id: "/run/credentials/${unit}.service/${id}";
  hostType = if tlsOn then "hostssl" else "host";
  # Prometheus's scrapes of the daemons: over TLS (a CA) and/or with basic authentication.
  ds = cfg.prometheus.daemonScrape;
  daemonScrapeCredentials =
    lib.optional (ds.caFile != null) "daemon-ca:${ds.caFile}"
    ++ lib.optional (ds.passwordFile != null) "daemon-password:${ds.passwordFile}"
    ++ lib.optionals (ds.certFile != null) [
      "daemon-cert:${ds.certFile}"
      "daemon-key:${ds.keyFile}"
    ];
  daemonScrape =
    lib.optionalAttrs (ds.caFile != null) {
      scheme = "https";
      tls_config = {
        ca_file = tlsPath "prometheus" "daemon-ca";
      }
      // lib.optionalAttrs (ds.serverName != null) { server_name = ds.serverName; }
      // lib.optionalAttrs (ds.certFile != null) {
        cert_file = tlsPath "prometheus" "daemon-cert";
        key_file = tlsPath "prometheus" "daemon-key";
      };
    }
    // lib.optionalAttrs (ds.username != null) {
      basic_auth = {
        inherit (ds) username;
        password_file = tlsPath "prometheus" "daemon-password";
      };
    };

  # The daemons on this host, whose job may scrape them however its targets spell this host
  # (127.0.0.1, localhost, its name): their /metrics (credentials.metrics-*,
  # metrics.basicAuthUsers) and daemonScrape must agree, and a mismatch is refused.
  scrapedHere = lib.filter (d: top.${d}.enable && cfg.prometheus.targets.${d} != [ ]) [
    "producer"
    "consumer"
  ];
  credentialGiven = d: id: (top.${d}.credentials.${id} or null) != null;
  daemonScrapeAssertions = lib.concatMap (
    d:
    let
      where = "services.sistema-mensajes.${d} (on this host, scraped at ${lib.head (localTarget d)})";
      users = top.${d}.metrics.basicAuthUsers;
      webSettings = credentialGiven d "metrics-tls-cert" || users != { };
    in
    [
      {
        # One scrape_config per job: its TLS and authentication settings hold for every target.
        assertion =
          cfg.prometheus.targets.${d} == localTarget d
          || (ds.caFile == null && ds.username == null && !webSettings);
        message = "${where}: the job `${d}` has targets other than this host's ${lib.head (localTarget d)} (stack.prometheus.targets.${d}), scraped with one set of settings (stack.prometheus.daemonScrape); with TLS or basic authentication, a job that scrapes a daemon on this host must keep the default target: scraping local and remote daemons with TLS or basic authentication in one job is not supported (run the daemons of a job all on other hosts, or all here).";
      }
      {
        assertion = credentialGiven d "metrics-tls-cert" == (ds.caFile != null);
        message =
          if ds.caFile == null then
            "${where} serves /metrics over TLS (credentials.metrics-tls-cert): set stack.prometheus.daemonScrape.caFile (the CA of that certificate) and, unless the certificate names ${lib.head (localTarget d)}, daemonScrape.serverName, so that Prometheus can verify it."
          else
            "${where} serves /metrics in plain http, but stack.prometheus.daemonScrape.caFile makes Prometheus scrape it over https: give it credentials.metrics-tls-cert and metrics-tls-key.";
      }
      {
        assertion = if ds.username == null then users == { } else users ? ${ds.username};
        message =
          if ds.username == null then
            "${where} asks for basic authentication (metrics.basicAuthUsers): set stack.prometheus.daemonScrape.username and passwordFile for one of its users."
          else
            "${where}: stack.prometheus.daemonScrape.username `${ds.username}` is not one of its metrics.basicAuthUsers.";
      }
      {
        assertion = credentialGiven d "metrics-client-ca" -> ds.certFile != null;
        message = "${where} requires a client certificate (credentials.metrics-client-ca): set stack.prometheus.daemonScrape.certFile and keyFile.";
      }
    ]
  ) scrapedHere;

  # --- PostgreSQL -----------------------------------------------------------------------------
  pg = cfg.postgresql;
  # The port names the socket file (/run/postgresql/.s.PGSQL.<port>), so it is part of the URL.
  pgPort = toString config.services.postgresql.settings.port;
  socketUrl = role: "postgres:///${pg.database}?host=/run/postgresql&port=${pgPort}&user=${role}";
  migrateUser = "sistema-migrate";
  grantsUnit = "sistema-mensajes-postgresql-grants.service";
  migrateUnit = "sistema-mensajes-postgresql-migrate.service";
  # `consumer migrate`'s settings: it connects as the owner (owner_url) and grants the role named
  # in `url`, the writer, what the consumer needs.
  migrateConfig = toml.generate "migrate.toml" cfg.postgresql.migrateSettings;
  migrateSettings = {
    postgres = {
      url = socketUrl pg.writerRole;
      owner_url = socketUrl pg.database;
      inherit (top.consumer.settings.postgres) schema;
    }
    # For `consumer maintain` (the maintain timer). Unset keys are not in `settings` (TOML has
    # no null).
    // lib.optionalAttrs (top.consumer.settings.postgres ? retention) {
      inherit (top.consumer.settings.postgres) retention;
    };
  };
  maintainUnit = "sistema-mensajes-postgresql-maintain";
  # `consumer VERB` with those settings, as the owner: a oneshot as `sistema-migrate` (static, so
  # that PostgreSQL's peer authentication sees this name: identMap), over the Unix socket only.
  asOwner =
    args:
    oneshotHardening
    // {
      Type = "oneshot";
      ExecStart = utils.escapeSystemdExecArgs (
        [
          consumerExe
          "--config"
          migrateConfig
        ]
        ++ args
      );
      User = migrateUser;
      Group = migrateUser;
      RestrictAddressFamilies = [ "AF_UNIX" ];
      IPAddressDeny = "any";
    };
  # The generated settings of a oneshot, exposed read-only so that CI can check them with the
  # consumer's own --check-config.
  generated =
    what: value:
    mkOption {
      type = toml.type;
      default = value;
      readOnly = true;
      internal = true;
      description = "The settings `consumer ${what}` gets (generated).";
    };
  # A generated text, exposed read-only so that CI can check it (promtool, the box).
  generatedText =
    description: value:
    mkOption {
      type = types.str;
      default = value;
      readOnly = true;
      internal = true;
      inherit description;
    };
  # A role's password for TCP logins, from a credential. PostgreSQL may log statements, so only
  # the SCRAM-SHA-256 verifier (`consumer hash-password`) goes into SQL, never the password; it
  # reaches psql on stdin, not on a command line.
  setPassword =
    role: credential:
    let
      psql = "psql -p ${pgPort} -d ${lib.escapeShellArg pg.database} -v ON_ERROR_STOP=1 -v role=${lib.escapeShellArg role}";
    in
    ''
      verifier=$(${consumerExe} hash-password <"$CREDENTIALS_DIRECTORY/${credential}")
      if ! [[ $verifier =~ ^SCRAM-SHA-256\$[0-9]+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$ ]]; then
        echo "consumer hash-password gave no SCRAM-SHA-256 verifier for ${role}" >&2
        exit 1
      fi
      ${psql} <<SQL
      \set verifier '$verifier'
      ALTER ROLE :"role" PASSWORD :'verifier';
      SQL
      echo "password of ${role} set (SCRAM-SHA-256 verifier)"
    '';
  passwords = lib.filter (p: p.file != null) [
    {
      role = pg.database;
      credential = "owner-password";
      file = pg.tcp.ownerPasswordFile;
    }
    {
      role = pg.writerRole;
      credential = "writer-password";
      file = pg.tcp.writerPasswordFile;
    }
  ];

  # --- Prometheus -----------------------------------------------------------------------------
  prom = config.services.prometheus;
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
    d:
    lib.optional top.${d}.enable (
      h.hostPort (h.connectAddress top.${d}.metrics.listenAddress) top.${d}.metrics.port
    );
  # What this host's Prometheus connects from when it scrapes a daemon here: loopback, or the
  # daemon's own address when it listens on one that is not.
  scrapeSources =
    d:
    h.loopback
    ++ lib.optional (!h.isLocal top.${d}.metrics.listenAddress) top.${d}.metrics.listenAddress;

  # --- Alertmanager ---------------------------------------------------------------------------
  am = cfg.alertmanager;
  amService = config.services.prometheus.alertmanager;
  amAddress = h.hostPort (h.connectAddress amService.listenAddress) amService.port;
  # NixOS always has the Alertmanager module (nixos/modules/module-list.nix). The offline
  # evaluator (../shared/nixos-eval) has not: there the Alertmanager part is left out, and
  # .ci/check-nix evaluates it with the module's options declared (.ci/nixos-eval/alertmanager.nix).
  haveAlertmanagerModule = options.services.prometheus ? alertmanager;

  # --- Exporters ------------------------------------------------------------------------------
  # nixos/modules/services/monitoring/prometheus/exporters.nix (node.nix, postgres.nix). As for
  # Alertmanager, the offline evaluator has no such module: .ci/nixos-eval/exporters-options.nix
  # declares the options the stack sets.
  haveExportersModule = options.services.prometheus ? exporters;
  exporter = config.services.prometheus.exporters;
  exporterTarget = e: h.hostPort (h.connectAddress exporter.${e}.listenAddress) exporter.${e}.port;
  # postgres_exporter's role: pg_monitor, nothing else (the grants unit grants it).
  exporterRole = "postgres-exporter";
  # The exporters' jobs this Prometheus scrapes: SistemaTargetMissing for them too, in a rule file
  # of their own (nixos/prometheus/alerts.yml names only the jobs every deployment has).
  exporterJobs = lib.filter (j: cfg.prometheus.targets.${j} != [ ]) [
    "node"
    "postgres"
  ];
  exporterRules = builtins.toJSON {
    groups = [
      {
        name = "sistema-mensajes-exporters";
        rules = map (j: {
          alert = "SistemaTargetMissing";
          expr = "absent(up{job=\"${j}\"})";
          for = "10m";
          # The job as a label too: one alert per job (promtool refuses two rules alike).
          labels = {
            severity = "critical";
            job = j;
          };
          annotations = {
            runbook_url = "https://github.com/sistema-mensajes/sistema-mensajes/blob/main/docs/runbooks/SistemaTargetMissing.md";
            summary = "Prometheus has no {{ $labels.job }} target at all.";
            description = "For 10 minutes Prometheus has had no target of job {{ $labels.job }}: not down, absent, so every alert on its series is silent. Check /api/v1/targets and the NixOS stack's `prometheus.targets`.";
          };
        }) exporterJobs;
      }
    ];
  };
  # Secrets reach alertmanager.service (DynamicUser) as credentials: PID 1 reads the files, as
  # root, and the configuration names the copies (Alertmanager reads `*_file` fields when it
  # sends, so `amtool check-config` at build time does not need them).
  amCredentials = "/run/credentials/alertmanager.service";
  amCredentialFiles = lib.filterAttrs (_: f: f != null) (
    am.credentials
    // {
      heartbeat-url = am.heartbeat.urlFile;
      webhook-url = am.webhook.urlFile;
      webhook-token = am.webhook.tokenFile;
    }
  );
  # A webhook_configs entry: the URL in the configuration, or (Alertmanager >= 0.26) read from a
  # credential.
  webhookUrl =
    w: credential:
    if w.urlFile != null then
      { url_file = "${amCredentials}/${credential}"; }
    else
      { inherit (w) url; };
  heartbeatReceiver = {
    name = "heartbeat";
  }
  // lib.optionalAttrs (am.heartbeat.url != null || am.heartbeat.urlFile != null) {
    webhook_configs = [ (webhookUrl am.heartbeat "heartbeat-url" // { send_resolved = false; }) ];
  };
  webhookReceiver = lib.optionalAttrs (am.webhook.url != null || am.webhook.urlFile != null) {
    webhook_configs = [
      (
        webhookUrl am.webhook "webhook-url"
        // {
          send_resolved = true;
        }
        // lib.optionalAttrs (am.webhook.tokenFile != null) {
          http_config.authorization = {
            type = "Bearer";
            credentials_file = "${amCredentials}/webhook-token";
          };
        }
      )
    ];
  };
  # The user's receiver: the webhook above plus `receiver`, lists concatenated.
  userReceiver =
    lib.zipAttrsWith (_: vs: if lib.all lib.isList vs then lib.concatLists vs else lib.last vs) [
      webhookReceiver
      am.receiver
    ]
    // {
      name = "sistema";
    };
  alertmanagerConfiguration = {
    route = {
      receiver = "sistema";
      group_by = [
        "alertname"
        "instance"
      ];
      group_wait = "30s";
      group_interval = "5m";
      repeat_interval = "4h";
      # SistemaWatchdog (nixos/prometheus/alerts.yml, severity "none") always fires: to the
      # heartbeat only, never to the user's receiver, about every heartbeat.repeatInterval.
      routes = [
        {
          matchers = [ ''alertname="SistemaWatchdog"'' ];
          receiver = "heartbeat";
          group_wait = "0s";
          group_interval = "1m";
          repeat_interval = am.heartbeat.repeatInterval;
        }
      ];
    };
    receivers = [
      heartbeatReceiver
      userReceiver
    ];
  };
in
{
  imports = [
    ./producer.nix
    ./consumer.nix
    # It was the owner's password, which the consumers then logged in as; they now use the writer.
    (lib.mkRenamedOptionModule
      [ "services" "sistema-mensajes" "stack" "postgresql" "tcp" "passwordFile" ]
      [ "services" "sistema-mensajes" "stack" "postgresql" "tcp" "ownerPasswordFile" ]
    )
  ];

  options.services.sistema-mensajes.stack = {
    enable = lib.mkEnableOption ''
      the whole stack on this host: RabbitMQ, PostgreSQL, Prometheus (with Alertmanager,
      node_exporter and postgres_exporter) and Grafana, provisioned for sistema-mensajes, with the
      daemons that are enabled here wired to them'';

    tls = {
      caFile = h.secretFile ''
        The CA (PEM) that signed `certFile` (and the daemons' client certificates, if they present
        any). With `certFile` and `keyFile`, RabbitMQ serves AMQP over TLS on `rabbitmq.tls.port` at
        `rabbitmq.listenAddress` (plain AMQP then only on 127.0.0.1, for the daemons on this host),
        and PostgreSQL takes TLS: logins over TCP from `postgresql.tcp.allowFrom` must use it
        (`hostssl`; plain TCP from there is rejected). The files reach both servers as credentials.
      '';
      certFile = h.secretFile "This host's certificate (PEM) for RabbitMQ and PostgreSQL: its subjectAltName holds the name the daemons connect to.";
      keyFile = h.secretFile "The certificate's key (PEM, unencrypted).";
    };

    rabbitmq = {
      enable = enableOption "RabbitMQ (with rabbitmq_prometheus and per-queue metrics, one user per daemon and one that declares the topology, no guest)";
      tls.port = mkOption {
        type = types.port;
        default = 5671;
        description = "Port of the AMQP-over-TLS listener (with `stack.tls`); `openFirewall` then opens it instead of the plain port.";
      };
      listenAddress = mkOption {
        type = types.str;
        default = "127.0.0.1";
        description = "Address RabbitMQ listens on for AMQP (`services.rabbitmq.listenAddress`); `0.0.0.0` for every IPv4 interface.";
      };
      openFirewall = lib.mkEnableOption "the AMQP port in the firewall, for daemons on other hosts";
      deliveryLimit = mkOption {
        type = types.nullOr types.ints.positive;
        default = 20;
        description = ''
          With a quorum queue (the consumer's `settings.amqp.queue_type = "quorum"`): after this
          many returns to the queue (a consumer that crashed or lost its link while holding the
          message), RabbitMQ dead-letters the message to the consumer's dead-letter exchange, at
          least once, instead of redelivering it forever (RabbitMQ 3.x) or, as RabbitMQ 4.x's
          documentation says of its default of 20 (not verified here: RabbitMQ 3.10 runs here),
          dropping it. Set by the provisioning unit as
          the policy `sistema-mensajes-delivery-limit-<queue>` (so it applies to a queue that
          exists). Null: no policy, RabbitMQ's own default.
        '';
      };
      metrics = {
        listenAddress = mkOption {
          type = types.str;
          default = "127.0.0.1";
          description = ''
            Address of RabbitMQ's Prometheus endpoint (rabbitmq_prometheus, `metrics.port`:
            `prometheus.tcp.ip`). It needs no password and shows every
            queue's name and depth, so it stays on loopback unless a Prometheus on another host needs
            it (then e.g. `0.0.0.0`, with `metrics.openFirewall`).
          '';
        };
        port = mkOption {
          type = types.port;
          default = 15692;
          description = "Port of RabbitMQ's Prometheus endpoint (rabbitmq_prometheus: `prometheus.tcp.port`).";
        };
        openFirewall = lib.mkEnableOption "RabbitMQ's metrics port (`metrics.port`, unauthenticated) in the firewall, for a Prometheus on another host";
      };
      topologySettings = generated "declare-topology" topologySettings;
      users = lib.genAttrs roles (r: {
        name = mkOption {
          type = types.str;
          default = "sistema-${r}";
          description =
            {
              producer = "Broker user of the producer: may publish to the exchange, nothing else.";
              consumer = "Broker user of the consumer: may consume the queue and publish to the dead-letter exchange, nothing else.";
              topology = "Broker user that declares the exchanges, queues and bindings (`consumer declare-topology`, in sistema-mensajes-rabbitmq-topology.service); no daemon uses it.";
            }
            .${r};
        };
        passwordFile = h.secretFile (
          if r == "topology" then
            ''
              File with the topology user's broker password. Null: a random one is generated at first
              boot in /var/lib/sistema-mensajes-rabbitmq/topology.password (a directory only the
              rabbitmq user and root can read). The units get it as a credential (`LoadCredential=`),
              so it may be readable by root only.
            ''
          else
            ''
              File with the ${r}'s broker password (the same file, or a copy, goes to the ${r}'s host as
              `services.sistema-mensajes.${r}.credentials.amqp-password`). Null: a random one is
              generated at first boot in /var/lib/sistema-mensajes-rabbitmq/${r}.password. The units
              get it as a credential (`LoadCredential=`), so it may be readable by root only.
            ''
        );
      });
    };

    postgresql = {
      enable = enableOption "PostgreSQL with the database, its owner role, a writer role for the consumer and a read-only role for Grafana";
      database = mkOption {
        type = types.str;
        default = "weather";
        description = ''
          Database, and the role that owns it (nixpkgs' `ensureDBOwnership` wants the same name). Only
          `consumer migrate` logs in as the owner (sistema-mensajes-postgresql-migrate.service, as the
          Unix user `${migrateUser}`, over the Unix socket with peer authentication).
        '';
      };
      writerRole = mkOption {
        type = types.str;
        default = "${pg.database}_writer";
        defaultText = lib.literalExpression ''"''${config.services.sistema-mensajes.stack.postgresql.database}_writer"'';
        description = ''
          Role the consumer logs in as: `consumer migrate` grants it USAGE on the schema, INSERT on
          `weather_logs` (no SELECT: its `ON CONFLICT DO NOTHING` names no column), SELECT on
          `schema_migrations` and EXECUTE on `weather_logs_conflicts`, and nothing else. A consumer
          on this host reaches it over the Unix socket with peer authentication (its Unix user is
          mapped to it): no password.
        '';
      };
      readerRole = mkOption {
        type = types.str;
        default = "weather_reader";
        description = "Role Grafana reads with: it may only SELECT from `weather_logs`, each statement for at most 30 s.";
      };
      tcp = {
        enable = lib.mkEnableOption "password logins over TCP (scram-sha-256) for consumers on other hosts, as the writer role";
        writerPasswordFile = h.secretFile "File with the writer role's password, for consumers on other hosts (they get the same file as `credentials.postgres-password`). Set in PostgreSQL as its SCRAM-SHA-256 verifier only.";
        ownerPasswordFile = h.secretFile "File with the owner role's password. Null: the owner cannot log in over TCP at all (the migrations run on this host). Set it only to run `consumer migrate` from another host; set in PostgreSQL as its SCRAM-SHA-256 verifier only.";
        allowFrom = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [
            "192.0.2.0/24"
            "2001:db8::/64"
          ];
          description = "Networks (pg_hba.conf addresses) the consumers connect from. Required with `tcp.enable`: nothing is open by default.";
        };
        openFirewall = lib.mkEnableOption "PostgreSQL's port in the firewall";
      };
      migrateSettings = generated "migrate" migrateSettings;
    };

    prometheus = {
      enable = enableOption "Prometheus (listening on 127.0.0.1 unless `services.prometheus.listenAddress` says otherwise), scraping itself and the jobs of `targets` (both daemons, RabbitMQ, node_exporter, postgres_exporter), with the pipeline's alert rules";
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
            rabbitmq = lib.optional rmq.enable (
              h.hostPort (h.connectAddress rmq.metrics.listenAddress) rabbitmqMetricsPort
            );
            node = lib.optional (haveExportersModule && cfg.exporters.node.enable) (exporterTarget "node");
            postgres = lib.optional (haveExportersModule && cfg.exporters.postgres.enable) (
              exporterTarget "postgres"
            );
          };
      daemonScrape = {
        caFile = h.secretFile "The CA (PEM) of the daemons' `/metrics` certificates (their `credentials.metrics-tls-cert`): the jobs `producer` and `consumer` then scrape over https. Handed to Prometheus as a credential.";
        username = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "User of the daemons' basic authentication (their `metrics.basicAuthUsers`), with `passwordFile`.";
        };
        passwordFile = h.secretFile "File with that user's password, handed to Prometheus as a credential (`basic_auth.password_file`).";
        certFile = h.secretFile "A client certificate (PEM) for daemons whose `/metrics` requires one (their `credentials.metrics-client-ca`), with `keyFile`. Prometheus's build-time check then runs with `--syntax-only` (promtool opens `cert_file` and `key_file`, which are credentials, there only at run time).";
        keyFile = h.secretFile "The client certificate's key (PEM, unencrypted).";
        serverName = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "backend.example.org";
          description = "Name the daemons' `/metrics` certificates are checked against (`tls_config.server_name`) instead of the target's host: for the daemons on this host, scraped at `127.0.0.1` unless their certificate holds that address.";
        };
      };
      rules = generatedText "nixos/prometheus/alerts.yml with the consumer's `amqp.queue` and `amqp.dead_letter_queue` in place of weather_queue and weather_dead_letter." alertRules;
      exporterRules = generatedText "SistemaTargetMissing for the exporters' jobs this Prometheus scrapes." exporterRules;
    };

    alertmanager = {
      enable = mkOption {
        type = types.bool;
        default = cfg.prometheus.enable;
        defaultText = lib.literalExpression "config.services.sistema-mensajes.stack.prometheus.enable";
        description = ''
          Whether to run Alertmanager on this host (on 127.0.0.1:9093 unless
          `services.prometheus.alertmanager.listenAddress` and `port` say otherwise), with this
          host's Prometheus sending it its alerts and scraping it. SistemaWatchdog, which always
          fires, goes to `heartbeat` only; every other alert to the receiver `sistema`
          (`webhook`, `receiver`). With neither set, alerts reach Alertmanager (its web UI) and no
          one else.
        '';
      };
      heartbeat = {
        url = mkOption {
          type = types.nullOr h.urlWithoutPassword;
          default = null;
          example = "https://hc-ping.example.org/your-check";
          description = ''
            URL that SistemaWatchdog is posted to (an Alertmanager webhook) about every
            `heartbeat.repeatInterval`: a dead man's switch service that pages when the posts stop.
            It is written to the world-readable Nix store: if the URL holds a token, use
            `heartbeat.urlFile`.
          '';
        };
        urlFile = h.secretFile ''
          File with the heartbeat URL (instead of `heartbeat.url`), for a URL that holds a token.
          Alertmanager gets it as a credential and reads it when it sends (`url_file`, Alertmanager
          0.26 or later).
        '';
        repeatInterval = mkOption {
          type = types.str;
          default = "5m";
          description = "How often SistemaWatchdog is sent again (Alertmanager `repeat_interval`, checked every minute). The heartbeat service's period must be longer.";
        };
      };
      webhook = {
        url = mkOption {
          type = types.nullOr h.urlWithoutPassword;
          default = null;
          example = "https://alerts.example.org/alertmanager";
          description = ''
            Webhook that gets every alert but SistemaWatchdog (Alertmanager's JSON), resolved ones
            too. Written to the world-readable Nix store: if the URL holds a token, use
            `webhook.urlFile`.
          '';
        };
        urlFile = h.secretFile "File with the webhook's URL (instead of `webhook.url`), read by Alertmanager when it sends (`url_file`, Alertmanager 0.26 or later).";
        tokenFile = h.secretFile "File with a bearer token for the webhook (`http_config.authorization.credentials_file`).";
      };
      receiver = mkOption {
        type = types.attrsOf types.anything;
        default = { };
        example = lib.literalExpression ''
          {
            email_configs = [ {
              to = "ops@example.org";
              from = "alertmanager@example.org";
              smarthost = "smtp.example.org:587";
              auth_username = "alertmanager@example.org";
              auth_password_file = "/run/credentials/alertmanager.service/smtp-password";
            } ];
          }
        '';
        description = ''
          More of the receiver `sistema` (every alert but SistemaWatchdog), as Alertmanager's
          `receiver` without `name`: `email_configs`, `slack_configs`, `webhook_configs` (added
          to `webhook`'s) and so on. It is written to the world-readable Nix store: give secrets as
          `*_file` fields naming `/run/credentials/alertmanager.service/<name>`, with the file in
          `credentials.<name>`. The file goes through envsubst: write a literal `$` as `$$`.
        '';
      };
      credentials = mkOption {
        type = types.attrsOf h.secretPath;
        default = { };
        example = {
          smtp-password = "/run/secrets/smtp-password";
        };
        description = ''
          Secret files for `receiver`: each reaches alertmanager.service as the credential
          `<name>` (`LoadCredential=`: PID 1 reads it, so it may be readable by root only), at
          `/run/credentials/alertmanager.service/<name>`.
        '';
      };
    };

    exporters = {
      node.enable = mkOption {
        type = types.bool;
        default = cfg.prometheus.enable;
        defaultText = lib.literalExpression "config.services.sistema-mensajes.stack.prometheus.enable";
        description = ''
          Whether to run node_exporter on this host (`services.prometheus.exporters.node`, on
          127.0.0.1:9100 unless its `listenAddress` says otherwise), scraped by the job `node`:
          free disk space and the clock, which SistemaHostDiskFull and SistemaHostClock* watch.
        '';
      };
      postgres.enable = mkOption {
        type = types.bool;
        default = pg.enable;
        defaultText = lib.literalExpression "config.services.sistema-mensajes.stack.postgresql.enable";
        description = ''
          Whether to run postgres_exporter beside this host's PostgreSQL
          (`services.prometheus.exporters.postgres`, on 127.0.0.1:9187), scraped by the job
          `postgres`: `pg_up`, which SistemaPostgresDown watches. It logs in over the Unix socket
          as the role `${exporterRole}` (peer authentication), which holds `pg_monitor` only.
        '';
      };
    };

    grafana = {
      enable = enableOption "Grafana with the Prometheus and PostgreSQL datasources and the pipeline's dashboards";
      adminPasswordFile = h.secretFile "File with the Grafana `admin` password (required).";
      secretKeyFile = h.secretFile "File with Grafana's `secret_key` (required: nixpkgs no longer has a default), e.g. from `openssl rand -hex 32`.";
      prometheusUrl = mkOption {
        type = types.str;
        default = "http://${h.hostPort (h.connectAddress prom.listenAddress) prom.port}";
        defaultText = lib.literalMD "`http://` and `services.prometheus.listenAddress` (127.0.0.1 for a wildcard) and `port`";
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

    (lib.mkIf (rmq.enable || pg.enable) {
      assertions = [
        {
          assertion =
            tlsOn || (cfg.tls.caFile == null && cfg.tls.certFile == null && cfg.tls.keyFile == null);
          message = "services.sistema-mensajes.stack.tls: caFile, certFile and keyFile go together (with only some of them, the broker and the database would serve plain text).";
        }
      ];
    })

    # --- RabbitMQ ---------------------------------------------------------------------------
    (lib.mkIf rmq.enable {
      # nixos/modules/services/amqp/rabbitmq.nix
      services.rabbitmq = {
        enable = true;
        listenAddress = if tlsOn then "127.0.0.1" else rmq.listenAddress;
        # rabbitmq.nix: configItems is attrsOf str.
        plugins = [ "rabbitmq_prometheus" ];
        configItems = {
          "prometheus.tcp.port" = toString rabbitmqMetricsPort;
          # No `prometheus.return_per_object_metrics`: the stack's Prometheus takes the per-queue
          # figures from /metrics/detailed (the `rabbitmq` job below), which serves them without it,
          # and a per-object /metrics costs the broker CPU at every scrape of it. The aggregated
          # /metrics stays cheap and is what broker-level alerting scrapes: the resource alarms
          # (rabbitmq_alarms_*) and the node's memory, disk space and file descriptors.
          # A reading is a few hundred bytes; RabbitMQ's default allows 128 MiB a message, which a
          # consumer must hold in memory whole before it can even reject it (docs/scaling.md, "Memory").
          "max_message_size" = toString (1024 * 1024);
        }
        # The listener's interface, as rabbitmq.nix sets `management.tcp.ip` for the management
        # plugin (rabbitmq_prometheus takes the same prometheus.tcp.* keys); "": every interface.
        // lib.optionalAttrs (rmq.metrics.listenAddress != "") {
          "prometheus.tcp.ip" = rmq.metrics.listenAddress;
        }
        # RabbitMQ's schema: listeners.ssl.<n> takes "ip:port" as listeners.tcp.1 does in
        # rabbitmq.nix; the ssl_options files must be readable when the node starts.
        // lib.optionalAttrs tlsOn {
          "listeners.ssl.1" = "${rmq.listenAddress}:${toString rmq.tls.port}";
          "ssl_options.cacertfile" = tlsPath "rabbitmq" "tls-ca";
          "ssl_options.certfile" = tlsPath "rabbitmq" "tls-cert";
          "ssl_options.keyfile" = tlsPath "rabbitmq" "tls-key";
          "ssl_options.verify" = "verify_peer";
          "ssl_options.fail_if_no_peer_cert" = "false";
        };
      };
      systemd.services.rabbitmq.serviceConfig.LoadCredential = lib.mkIf tlsOn tlsCredentials;

      systemd.services.sistema-mensajes-rabbitmq-provision = {
        description = "sistema-mensajes: RabbitMQ users for the daemons and the topology";
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
          # The generated passwords: readable by rabbitmq (which administers the broker anyway) and
          # root (PID 1 hands them to the units as credentials), no one else.
          StateDirectory = "sistema-mensajes-rabbitmq";
          StateDirectoryMode = "0700";
          UMask = "0077";
          ExecStart =
            utils.escapeSystemdExecArgs (
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
              ++ lib.optionals ((names.queue_type or "classic") == "quorum" && rmq.deliveryLimit != null) [
                "--delivery-limit"
                (toString rmq.deliveryLimit)
              ]
            )
            + " "
            + lib.concatMapStringsSep " " provisionSpec roles;
          LoadCredential = lib.mkIf (lib.any givenPassword roles) (
            map (r: "${provisionCredential r}:${rmq.users.${r}.passwordFile}") (lib.filter givenPassword roles)
          );
        };
      };

      # The exchanges, queues and bindings, declared once by the topology user, so that the
      # daemons' users need no configure permission (their `amqp.declare` is false).
      systemd.services.sistema-mensajes-rabbitmq-topology = {
        description = "sistema-mensajes: RabbitMQ exchanges and queues (consumer declare-topology)";
        wantedBy = [ "multi-user.target" ];
        requires = [ provisionUnit ];
        after = [ provisionUnit ];
        serviceConfig =
          oneshotHardening
          // {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = utils.escapeSystemdExecArgs [
              consumerExe
              "--config"
              topologyConfig
              "declare-topology"
            ];
            DynamicUser = true;
            LoadCredential = [ "amqp-password:${passwordFile "topology"}" ];
            RestrictAddressFamilies = [
              "AF_UNIX"
              "AF_INET"
              "AF_INET6"
            ];
          }
          # The local broker only, when its address is known (h.urlAddresses: null for a DNS name).
          // lib.optionalAttrs (topologyAddresses != null) {
            IPAddressAllow = topologyAddresses;
            IPAddressDeny = "any";
          };
      };

      networking.firewall.allowedTCPPorts =
        lib.optional rmq.openFirewall (if tlsOn then rmq.tls.port else amqpPort)
        ++ lib.optional rmq.metrics.openFirewall rabbitmqMetricsPort;
    })

    # Daemons on this host and the broker: our user, its password, no declarations, after the
    # users and the topology exist.
    (lib.mkIf rmq.enable {
      services.sistema-mensajes = lib.genAttrs [ "producer" "consumer" ] (d: {
        settings.amqp = {
          url = mkDefault (localAmqpUrl rmq.users.${d}.name);
          declare = mkDefault false;
        };
        credentials.amqp-password = mkDefault (passwordFile d);
      });
      systemd.services = lib.genAttrs [ "producer" "consumer" ] (
        d:
        lib.mkIf top.${d}.enable {
          wants = [
            provisionUnit
            topologyUnit
          ];
          after = [
            provisionUnit
            topologyUnit
          ];
        }
      );
    })

    # --- PostgreSQL -------------------------------------------------------------------------
    (lib.mkIf pg.enable {
      assertions = [
        {
          assertion = !pg.tcp.enable || pg.tcp.allowFrom != [ ];
          message = "services.sistema-mensajes.stack.postgresql.tcp: list the networks the consumers connect from in tcp.allowFrom (it is empty, so no TCP login would be accepted; nothing is open by default).";
        }
      ];
      warnings = lib.optional (pg.tcp.enable && pg.tcp.writerPasswordFile == null) ''
        services.sistema-mensajes.stack.postgresql.tcp.enable is set without tcp.writerPasswordFile:
        the writer role ${pg.writerRole} has no password, so no consumer can log in over TCP unless
        you set one yourself.
      '';

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
          { name = pg.writerRole; }
          { name = pg.readerRole; }
        ];
        # Peer authentication over the Unix socket, mapped: the consumer's Unix user logs in as the
        # writer (never as the owner), the migrations' as the owner, Grafana's as the read-only
        # role. Inserted above nixpkgs' defaults, so these lines decide for these roles.
        identMap = ''
          sistema-mensajes ${top.consumer.user} ${pg.writerRole}
          sistema-mensajes ${migrateUser} ${pg.database}
          sistema-mensajes grafana ${pg.readerRole}
        '';
        authentication = ''
          local ${pg.database} ${pg.database} peer map=sistema-mensajes
          local ${pg.database} ${pg.writerRole} peer map=sistema-mensajes
          local ${pg.database} ${pg.readerRole} peer map=sistema-mensajes
        ''
        + lib.optionalString pg.tcp.enable (
          lib.concatMapStrings (
            net:
            "${hostType} ${pg.database} ${pg.writerRole} ${net} scram-sha-256\n"
            + lib.optionalString (
              pg.tcp.ownerPasswordFile != null
            ) "${hostType} ${pg.database} ${pg.database} ${net} scram-sha-256\n"
            # With TLS, nothing in plain text from there (the first matching line decides).
            + lib.optionalString tlsOn "hostnossl all all ${net} reject\n"
          ) pg.tcp.allowFrom
        );
        settings = lib.mkIf tlsOn {
          ssl = true;
          ssl_ca_file = tlsPath "postgresql" "tls-ca";
          ssl_cert_file = tlsPath "postgresql" "tls-cert";
          ssl_key_file = tlsPath "postgresql" "tls-key";
        };
      };
      # PostgreSQL accepts the key's copy: root's, readable through systemd's ACL for postgres
      # (mode 0440 as stat shows it), within its "0640 or less if owned by root".
      systemd.services.postgresql.serviceConfig.LoadCredential = lib.mkIf tlsOn tlsCredentials;

      # The read-only role may read weather_logs once it exists (an event trigger grants it when
      # the migrations create it), with a statement timeout; the roles' passwords, for TCP logins.
      systemd.services.sistema-mensajes-postgresql-grants = {
        description = "sistema-mensajes: PostgreSQL grants for the read-only role, role passwords";
        wantedBy = [ "multi-user.target" ];
        requires = [ "postgresql.target" ];
        after = [ "postgresql.target" ];
        path = [ config.services.postgresql.finalPackage ];
        script = ''
          psql -p ${pgPort} -d ${lib.escapeShellArg pg.database} -v ON_ERROR_STOP=1 \
            -v owner=${lib.escapeShellArg pg.database} -v writer=${lib.escapeShellArg pg.writerRole} \
            -v reader=${lib.escapeShellArg pg.readerRole} \
            -v schema=${lib.escapeShellArg top.consumer.settings.postgres.schema} \
            -f ${./postgresql-grants.sql}
        ''
        + lib.optionalString cfg.exporters.postgres.enable ''
          psql -p ${pgPort} -d ${lib.escapeShellArg pg.database} -v ON_ERROR_STOP=1 -c 'GRANT pg_monitor TO "${exporterRole}"'
        ''
        + lib.concatMapStrings (p: setPassword p.role p.credential) passwords;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          User = "postgres";
          Group = "postgres";
          LoadCredential = lib.mkIf (passwords != [ ]) (map (p: "${p.credential}:${p.file}") passwords);
        };
      };

      # The migrations, as the database's owner, before the consumer (whose role could not apply
      # them): `consumer migrate` applies the pending ones and grants the writer what it needs.
      users.users.${migrateUser} = {
        isSystemUser = true;
        group = migrateUser;
        description = "sistema-mensajes database migrations, as the database's owner";
      };
      users.groups.${migrateUser} = { };
      systemd.services.sistema-mensajes-postgresql-migrate = {
        description = "sistema-mensajes: database migrations, as the owner (consumer migrate)";
        wantedBy = [ "multi-user.target" ];
        # Wants, not Requires: a restart of PostgreSQL would otherwise restart this unit, and with
        # it the consumer (which Requires it). Unreachable, it exits 75 and is retried. After the
        # grants, so that the event trigger is there when weather_logs is created.
        wants = [
          "postgresql.target"
          grantsUnit
        ];
        after = [
          "postgresql.target"
          grantsUnit
        ];
        # --schema-only: the conversion of weather_logs to partitions, which reads a large table
        # for long, is the maintain unit's, which nothing waits for (an empty table is converted
        # here, at once).
        serviceConfig =
          asOwner [
            "migrate"
            "--schema-only"
          ]
          // {
            RemainAfterExit = true;
          };
      };

      # The daily partitions of weather_logs, made 7 days ahead, and retention
      # (settings.postgres.retention): `consumer maintain`, as the owner, every hour. Timer options:
      # nixpkgs nixos/lib/systemd-unit-options.nix (timerOptions.timerConfig).
      systemd.services.${maintainUnit} = {
        description = "sistema-mensajes: partitions of weather_logs ahead, and retention (consumer maintain)";
        wants = [ migrateUnit ];
        after = [
          "postgresql.target"
          migrateUnit
        ];
        # Started by its timer only: wanted by multi-user.target, it would hold the boot (and
        # `nixos-rebuild switch`) for as long as a large table's conversion takes.
        serviceConfig = asOwner [ "maintain" ];
      };
      systemd.timers.${maintainUnit} = {
        description = "sistema-mensajes: partitions of weather_logs ahead, and retention, every hour";
        wantedBy = [ "timers.target" ];
        # A minute after boot (it converts weather_logs if needed, while the consumer writes), then
        # every hour.
        timerConfig = {
          OnBootSec = "1min";
          OnCalendar = "hourly";
          RandomizedDelaySec = "5min";
          Persistent = true;
        };
      };

      networking.firewall.allowedTCPPorts = lib.optional pg.tcp.openFirewall config.services.postgresql.settings.port;

      services.sistema-mensajes.consumer.settings.postgres = {
        url = mkDefault (socketUrl pg.writerRole);
        # The migrate unit applies them; the writer only checks.
        migrate = mkDefault false;
      };
      # A consumer on this host starts after the migrations. Wants=, not Requires=: on systemd 254
      # and later a oneshot that exits 75 passes through a failed state before it restarts
      # (RestartMode=normal), which would fail a Requires= dependent for good; the consumer
      # (postgres.migrate = false) waits for the migrations by itself instead.
      systemd.services.consumer = lib.mkIf top.consumer.enable {
        wants = [ migrateUnit ];
        after = [ migrateUnit ];
      };
    })

    # --- Prometheus -------------------------------------------------------------------------
    (lib.mkIf cfg.prometheus.enable {
      # nixos/modules/services/monitoring/prometheus/default.nix
      services.prometheus = {
        enable = true;
        # Its web UI and API need no password: loopback unless set otherwise (nixpkgs: 0.0.0.0).
        listenAddress = mkDefault "127.0.0.1";
        globalConfig.scrape_interval = mkDefault "15s";
        scrapeConfigs =
          job "producer" cfg.prometheus.targets.producer daemonScrape
          ++ job "consumer" cfg.prometheus.targets.consumer daemonScrape
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
          # The node's alarms and headroom, from the aggregated /metrics (rabbitmq_alarms_* is
          # served only there), as nixos/prometheus/prometheus.yml.
          ++ job "rabbitmq-node" cfg.prometheus.targets.rabbitmq { }
          ++ job "prometheus" [ (h.hostPort (h.connectAddress prom.listenAddress) prom.port) ] { }
          ++ job "node" cfg.prometheus.targets.node { }
          ++ job "postgres" cfg.prometheus.targets.postgres { };
        # nixos/prometheus/alerts.yml with this deployment's queue, checked by promtool when the
        # system is built.
        ruleFiles = [
          (pkgs.writeText "sistema-mensajes-alerts.yml" alertRules)
        ]
        ++ lib.optional (exporterJobs != [ ]) (
          pkgs.writeText "sistema-mensajes-exporter-alerts.yml" exporterRules
        );
      };
      # prometheus/default.nix's unit has no LoadCredential of its own; promtool, at build time,
      # does not open ca_file or basic_auth.password_file (cmd/promtool checkConfig).
      systemd.services.prometheus.serviceConfig.LoadCredential = lib.mkIf (
        daemonScrapeCredentials != [ ]
      ) daemonScrapeCredentials;
      # prometheus/default.nix: checkConfig is bool or "syntax-only"; promtool stats cert_file.
      services.prometheus.checkConfig = lib.mkIf (ds.certFile != null) (mkDefault "syntax-only");
      warnings =
        lib.optional (ds.username != null && ds.caFile == null) ''
          services.sistema-mensajes.stack.prometheus.daemonScrape: a username without caFile sends the scrape
          password over plain http.
        ''
        ++ lib.optional (ds.caFile != null && ds.serverName == null && scrapedHere != [ ]) ''
          services.sistema-mensajes.stack.prometheus.daemonScrape: this host's ${lib.concatStringsSep " and " scrapedHere}
          are scraped over https at ${
            lib.concatMapStringsSep ", " (d: lib.head (localTarget d)) scrapedHere
          }; unless their /metrics certificate holds that address, set daemonScrape.serverName to a name it holds.
        '';
      assertions = [
        {
          assertion = queueNameOk;
          message = "services.sistema-mensajes.consumer.settings.amqp.queue `${names.queue}`: the stack's alert rules take a queue name of letters, digits and `_.:-` only; use such a name, or disable stack.prometheus and write the rules yourself.";
        }
        {
          assertion = (ds.username == null) == (ds.passwordFile == null);
          message = "services.sistema-mensajes.stack.prometheus.daemonScrape: username and passwordFile go together.";
        }
        {
          assertion =
            (ds.certFile == null) == (ds.keyFile == null) && (ds.certFile != null -> ds.caFile != null);
          message = "services.sistema-mensajes.stack.prometheus.daemonScrape: certFile and keyFile go together, and with caFile.";
        }
      ]
      ++ daemonScrapeAssertions;

      # The daemons on this host let this Prometheus connect to their metrics sockets.
      services.sistema-mensajes = lib.genAttrs [ "producer" "consumer" ] (
        d: lib.mkIf top.${d}.enable { metrics.allowFrom = scrapeSources d; }
      );
    })

    # --- Alertmanager -----------------------------------------------------------------------
    (lib.mkIf am.enable {
      assertions = [
        {
          assertion = cfg.prometheus.enable;
          message = "services.sistema-mensajes.stack.alertmanager: it gets its alerts from this host's Prometheus; enable stack.prometheus too.";
        }
        {
          assertion = am.heartbeat.url == null || am.heartbeat.urlFile == null;
          message = "services.sistema-mensajes.stack.alertmanager.heartbeat: set url or urlFile, not both.";
        }
        {
          assertion = am.webhook.url == null || am.webhook.urlFile == null;
          message = "services.sistema-mensajes.stack.alertmanager.webhook: set url or urlFile, not both.";
        }
        {
          assertion = am.webhook.tokenFile == null || am.webhook.url != null || am.webhook.urlFile != null;
          message = "services.sistema-mensajes.stack.alertmanager.webhook.tokenFile: set webhook.url or webhook.urlFile too.";
        }
        {
          assertion =
            !lib.any (
              n:
              lib.elem n [
                "heartbeat-url"
                "webhook-url"
                "webhook-token"
              ]
            ) (lib.attrNames am.credentials);
          message = "services.sistema-mensajes.stack.alertmanager.credentials: heartbeat-url, webhook-url and webhook-token are taken by heartbeat.urlFile, webhook.urlFile and webhook.tokenFile.";
        }
      ];
    })
    (lib.mkIf am.enable (
      lib.optionalAttrs haveAlertmanagerModule {
        services.prometheus = {
          # nixos/modules/services/monitoring/prometheus/alertmanager.nix
          alertmanager = {
            enable = true;
            # Its web UI and API (silences!) need no password: loopback unless set otherwise
            # (nixpkgs: "", every interface).
            listenAddress = mkDefault "127.0.0.1";
            # Without peers, no HA gossip either (Alertmanager's default: 0.0.0.0:9094, TCP and
            # UDP; "Set to empty string to disable HA mode", `alertmanager --help`).
            extraFlags = lib.optional (amService.clusterPeers == [ ]) "--cluster.listen-address=";
            configuration = alertmanagerConfiguration;
          };
          # prometheus/default.nix: alertmanagers is listOf attrs, prometheus.yml's
          # alerting.alertmanagers.
          alertmanagers = [ { static_configs = [ { targets = [ amAddress ]; } ]; } ];
          scrapeConfigs = job "alertmanager" [ amAddress ] { };
        };
        systemd.services.alertmanager.serviceConfig.LoadCredential = lib.mapAttrsToList (
          n: f: "${n}:${toString f}"
        ) amCredentialFiles;
      }
    ))

    # --- Exporters --------------------------------------------------------------------------
    (lib.mkIf cfg.exporters.node.enable (
      lib.optionalAttrs haveExportersModule {
        # exporters.nix: listenAddress defaults to 0.0.0.0; loopback, as the daemons' metrics.
        services.prometheus.exporters.node = {
          enable = true;
          listenAddress = mkDefault "127.0.0.1";
        };
      }
    ))
    (lib.mkIf cfg.exporters.postgres.enable {
      assertions = [
        {
          assertion = pg.enable;
          message = "services.sistema-mensajes.stack.exporters.postgres: it watches this host's PostgreSQL; enable stack.postgresql too.";
        }
      ];
    })
    (lib.mkIf (cfg.exporters.postgres.enable && pg.enable) (
      lib.mkMerge [
        { services.postgresql.ensureUsers = [ { name = exporterRole; } ]; }
        (lib.optionalAttrs haveExportersModule {
          # exporters/postgres.nix: a static user named like the role (peer authentication, by
          # pg_hba's `local all all peer`), dataSourceName in DATA_SOURCE_NAME; AF_UNIX added to its
          # address families.
          services.prometheus.exporters.postgres = {
            enable = true;
            listenAddress = mkDefault "127.0.0.1";
            user = exporterRole;
            group = exporterRole;
            dataSourceName = "user=${exporterRole} database=${pg.database} host=/run/postgresql port=${pgPort} sslmode=disable";
          };
        })
      ]
    ))

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
        # The datasource's url is the socket directory; its driver takes the port (the socket
        # file's name) from PGPORT, as libpq does.
        environment = lib.mkIf pg.enable { PGPORT = pgPort; };
        serviceConfig.LoadCredential = [
          "admin-password:${toString cfg.grafana.adminPasswordFile}"
          "secret-key:${toString cfg.grafana.secretKeyFile}"
        ];
      };
    })
  ];
}
