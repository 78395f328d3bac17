# services.sistema-mensajes.<daemon>: one daemon, run from the package's own units.
#
# The units come from the package (`systemd.packages`: $out/lib/systemd/system/<daemon>.{service,socket},
# the files in systemd/ with store paths). This module adds only what a deployment needs, as a
# drop-in: the start command with the generated config, the metrics socket's address, credentials,
# the user, ordering against the local broker and database, and `wantedBy` (systemd.packages ignores
# [Install]). The hardening stays in systemd/<daemon>.service, the one place it is written; the
# drop-in adds only the IP access lists, which depend on the deployment (the hosts the daemon
# connects to, who may scrape it).
#
# systemd settings used here: IPAddressAllow=/IPAddressDeny= (systemd.resource-control(5), in the
# [Service] and [Socket] sections), set through systemd.{services,sockets}.<name>.{serviceConfig,
# socketConfig} (nixos/lib/systemd-unit-options.nix).
{
  daemon,
  description,
  metricsPort,
  credentials,
  # The settings whose `url` the daemon connects to (the service's IP access list).
  connectsTo ? [ "amqp" ],
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
  configFile = toml.generate "${daemon}.toml" cfg.fileSettings;
  str =
    default: text:
    mkOption {
      type = types.str;
      inherit default;
      description = text;
    };
  # Typed keys of `settings` that may be left unset (null: not written, TOML has no null).
  optional =
    type: text:
    mkOption {
      type = types.nullOr type;
      default = null;
      description = text;
    };
  url =
    default: text:
    mkOption {
      type = h.urlWithoutPassword;
      inherit default;
      description = text;
    };
  optionalUrl = optional h.urlWithoutPassword;
  optionalStr = optional types.str;
  secret = optional h.secretPath;
  bool =
    default: text:
    mkOption {
      type = types.bool;
      inherit default;
      description = text;
    };
  # The `*password_file` settings the daemons know, each with the credential the daemon reads when
  # the setting is absent (src/config/). A file given there does not reach the daemon as a path,
  # which its own user would have to be able to read: it is handed over as that credential
  # (LoadCredential=: PID 1 reads it, so it may be readable by root only) and left out of the TOML.
  # Given both ways, the setting wins, as it would in the daemon.
  passwordSettings = lib.filter (p: lib.attrByPath p.path null cfg.settings != null) [
    {
      path = [
        "amqp"
        "password_file"
      ];
      credential = "amqp-password";
    }
    {
      path = [
        "postgres"
        "password_file"
      ];
      credential = "postgres-password";
    }
    {
      path = [
        "postgres"
        "owner_password_file"
      ];
      credential = "postgres-owner-password";
    }
  ];
  # TLS files are credentials too (a key may then be root's, 0400), and the URLs name them where
  # the daemon finds them: RabbitMQ's URI parameters, libpq's for PostgreSQL (docs/configuration.md,
  # "TLS"). The URL's own sslmode stays as written.
  credentialPath = id: "/run/credentials/${daemon}.service/${id}";
  tlsParameters = {
    amqp = {
      cacertfile = "amqp-tls-ca";
      certfile = "amqp-tls-cert";
      keyfile = "amqp-tls-key";
    };
    postgres = {
      sslrootcert = "postgres-tls-ca";
      sslcert = "postgres-tls-cert";
      sslkey = "postgres-tls-key";
    };
  };
  given = id: (cfg.credentials.${id} or null) != null;
  withTlsFiles =
    section: url:
    if lib.isList url then map (withTlsFiles section) url else withTlsFilesOne section url;
  withTlsFilesOne =
    section: url:
    let
      params = lib.mapAttrsToList (param: id: "${param}=${credentialPath id}") (
        lib.filterAttrs (_: given) tlsParameters.${section}
      );
    in
    if params == [ ] then
      url
    else
      url + (if lib.hasInfix "?" url then "&" else "?") + lib.concatStringsSep "&" params;
  withoutPasswordFiles = lib.foldl' (
    s: p:
    let
      section = lib.head p.path;
    in
    s // { ${section} = removeAttrs s.${section} (lib.tail p.path); }
  ) cfg.settings passwordSettings;
  # Both PostgreSQL URLs get the files: `consumer migrate` connects with `owner_url`, and the
  # consumer checks it at every start.
  fileSettings = lib.mapAttrs (
    section: v:
    if tlsParameters ? ${section} then
      v
      // lib.mapAttrs (_: withTlsFiles section) (
        lib.getAttrs (lib.intersectLists [ "url" "owner_url" ] (lib.attrNames v)) v
      )
    else
      v
  ) withoutPasswordFiles;
  # A URL that names a file the credentials name too would give the parameter twice, which the
  # daemon refuses at start: caught here instead.
  urlsNaming =
    section:
    lib.filter (
      param:
      given tlsParameters.${section}.${param}
      && lib.any (u: builtins.match ".*[?&]${param}=.*" u != null) (
        lib.filter lib.isString (
          lib.flatten [
            (cfg.settings.${section}.url or null)
            (cfg.settings.${section}.owner_url or null)
          ]
        )
      )
    ) (lib.attrNames tlsParameters.${section});
  postgresUrl = cfg.settings.postgres.url or "";
  # /metrics over TLS and/or with basic authentication: the Prometheus exporters' web
  # configuration (src/web.rs), JSON being YAML. It holds paths and bcrypt hashes, no secret.
  metricsTls = given "metrics-tls-cert" && given "metrics-tls-key";
  webConfig = pkgs.writeText "${daemon}-web-config.yml" webConfigText;
  webConfigText = (
    builtins.toJSON (
      lib.optionalAttrs metricsTls {
        tls_server_config = {
          cert_file = credentialPath "metrics-tls-cert";
          key_file = credentialPath "metrics-tls-key";
        }
        // lib.optionalAttrs (given "metrics-client-ca") {
          client_auth_type = "RequireAndVerifyClientCert";
          client_ca_file = credentialPath "metrics-client-ca";
        };
      }
      // lib.optionalAttrs (cfg.metrics.basicAuthUsers != { }) {
        basic_auth_users = cfg.metrics.basicAuthUsers;
      }
    )
  );
  credentialFiles =
    lib.filterAttrs (_: file: file != null) cfg.credentials
    // lib.listToAttrs (
      map (p: lib.nameValuePair p.credential (lib.getAttrFromPath p.path cfg.settings)) passwordSettings
    );

  # The service's IP access list: the hosts of the URLs it connects to, when every one is an IP
  # address, `localhost` or a Unix socket. A DNS name (the usual case across hosts) could only be
  # resolved at run time, so the service is then left open: list its addresses yourself with
  # systemd.services.<daemon>.serviceConfig.IPAddressAllow/IPAddressDeny if you want the same.
  # The metrics socket needs nothing here: connections accepted on the socket systemd passes in
  # are filtered by the socket unit's own list, never the service's (systemd.resource-control(5),
  # IPAddressAllow=: "the IP access list configured for the service is not applied to any sockets
  # passed into the service via socket activation").
  addresses = h.urlAddresses (lib.concatMap (k: lib.toList cfg.settings.${k}.url) connectsTo);
  loopbackOnly = lib.all (
    a:
    lib.elem a (
      h.loopback
      ++ [
        "localhost"
        "127.0.0.1"
        "::1/128"
      ]
    )
  ) cfg.metrics.allowFrom;
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
        The daemon's configuration (docs/configuration.md), written to a TOML file in the store
        and passed with `--config`. Any key of the daemon's config may be set; the daemon rejects
        unknown ones (exit 78). No passwords here: see `credentials` (a URL holding a password, or
        a `*password_file` in the store, fails evaluation). `metrics.listen` is set from
        `metrics.listenAddress` and `metrics.port`, so the socket and the config cannot disagree.
      '';
      example = lib.literalExpression ''{ amqp.prefetch = 500; log.level = "info"; }'';
      # Unset typed keys (null) are left out of the file.
      apply = lib.filterAttrsRecursive (_: v: v != null);
      type = types.submodule {
        freeformType = toml.type;
        options = {
          amqp = {
            url = mkOption {
              type = types.either h.urlWithoutPassword (types.nonEmptyListOf h.urlWithoutPassword);
              default = "amqp://guest@127.0.0.1:5672/%2f";
              description = "Broker URI without the password (one in it fails evaluation: this file is in the world-readable store); or a list of them, one per node of a RabbitMQ cluster: the daemon connects to the first that answers, and after a lost connection tries the next first.";
            };
            password_file = secret "File with the broker password. Handed to the daemon as the credential `amqp-password` (`LoadCredential=`, so it may be readable by root only) instead of as a path, and then preferred to `credentials.amqp-password`.";
            declare = bool true ''
              Whether the daemon declares the exchanges and queues it uses (which needs the broker's
              configure permission on them). False: it only checks, passively, that they exist (no
              permission needed) and waits until they do; `consumer declare-topology` declares them.
              The stack sets it to false for the daemons on its host.
            '';
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
        // extraSettings {
          inherit
            str
            url
            optionalUrl
            optionalStr
            secret
            bool
            ;
        };
      };
    };

    metrics = {
      listenAddress = str "127.0.0.1" "Address of the `/metrics` socket (`${daemon}.socket`).";
      port = mkOption {
        type = types.port;
        default = metricsPort;
        description = "Port of the `/metrics` socket (`${daemon}.socket`).";
      };
      basicAuthUsers = mkOption {
        type = types.attrsOf types.str;
        default = { };
        example = {
          prometheus = "$2y$10$…";
        };
        description = ''
          Users who may read `/metrics`, each with a bcrypt hash of their password
          (`htpasswd -nBC 10 prometheus`): the exporters' `basic_auth_users`. The hashes go into the
          world-readable store (a hash, not the password). With `credentials.metrics-tls-cert` and
          `credentials.metrics-tls-key`, `/metrics` is served over TLS; with
          `credentials.metrics-client-ca` too, scrapers need a certificate that CA signed.
        '';
      };
      openFirewall = lib.mkEnableOption "the metrics port in the firewall, for a Prometheus on another host (list that host in `metrics.allowFrom` too)";
      allowFrom = mkOption {
        type = types.listOf h.ipAddressPrefix;
        default = h.loopback;
        apply = lib.unique;
        example = [
          "127.0.0.0/8"
          "::1"
          "192.0.2.10"
        ];
        description = ''
          Addresses that may connect to the `/metrics` socket (`${daemon}.socket`: `IPAddressAllow=`
          these, replacing the package unit's `localhost`, and `IPAddressDeny=any`); anyone else's
          connection is dropped. Any connection to the
          socket starts `${daemon}.service` if it is stopped, so this matters even with the
          firewall open. Defaults to loopback; the stack adds what its own Prometheus needs; a
          Prometheus on another host must be listed here. Empty: nobody.
        '';
      };
    };

    webConfigText = mkOption {
      type = types.str;
      default = webConfigText;
      readOnly = true;
      internal = true;
      description = "The `/metrics` web configuration file's text (generated; used when TLS or users are set).";
    };

    fileSettings = mkOption {
      type = toml.type;
      default = fileSettings;
      readOnly = true;
      internal = true;
      description = "The settings written to `${daemon}.toml` (generated): `settings`, less the `*password_file` keys, which become credentials.";
    };

    credentials =
      lib.mapAttrs
        (
          id: text:
          h.secretFile ''
            File holding ${text}, handed to the daemon as the systemd credential `${id}`
            (`LoadCredential=`), which it reads from `$CREDENTIALS_DIRECTORY`. Null: no
            `LoadCredential=` line at all (a missing file would stop the unit from starting).
          ''
        )
        (
          credentials
          // {
            amqp-tls-ca = "the CA that signed the broker's certificate (PEM; `cacertfile=` is added to `settings.amqp.url`, which must be `amqps://`)";
            amqp-tls-cert = "a client certificate for the broker (PEM; `certfile=`; with `auth_mechanism=external` in the URL it logs in by it)";
            amqp-tls-key = "the client certificate's key (PEM, unencrypted; `keyfile=`)";
            metrics-tls-cert = "the certificate `/metrics` is served over TLS with (PEM)";
            metrics-tls-key = "its key (PEM, unencrypted)";
            metrics-client-ca = "the CA whose certificates scrapers must present to `/metrics` (PEM)";
          }
        );
  };

  config = lib.mkIf cfg.enable {
    services.sistema-mensajes.${daemon}.settings.metrics = {
      inherit listen;
      web_config_file = lib.mkIf (metricsTls || cfg.metrics.basicAuthUsers != { }) "${webConfig}";
    };

    assertions = [
      {
        assertion =
          !(lib.any given (lib.attrValues tlsParameters.amqp))
          || lib.all (lib.hasPrefix "amqps://") (lib.toList cfg.settings.amqp.url);
        message = "services.sistema-mensajes.${daemon}: credentials.amqp-tls-* are set, but settings.amqp.url is not `amqps://` (each URL, if a list): the broker would be reached in plain text.";
      }
      {
        assertion = given "metrics-tls-cert" == given "metrics-tls-key";
        message = "services.sistema-mensajes.${daemon}: credentials.metrics-tls-cert and credentials.metrics-tls-key go together.";
      }
      {
        assertion = !(given "metrics-client-ca") || metricsTls;
        message = "services.sistema-mensajes.${daemon}: credentials.metrics-client-ca needs credentials.metrics-tls-cert and metrics-tls-key (client certificates are checked over TLS only).";
      }
      {
        assertion = urlsNaming "amqp" == [ ] && (cfg.settings ? postgres -> urlsNaming "postgres" == [ ]);
        message = "services.sistema-mensajes.${daemon}: settings.*.url names ${
          lib.concatStringsSep ", " (
            urlsNaming "amqp" ++ lib.optionals (cfg.settings ? postgres) (urlsNaming "postgres")
          )
        } itself, and the credentials add it again: give the file one way.";
      }
    ];

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
      # Filtered in the kernel (cgroup BPF) before the daemon sees anything; connections the
      # socket accepts stay under these rules after systemd passes it to the service. "" resets
      # the package unit's lists (IPAddressAllow=localhost), so that allowFrom is the whole list.
      socketConfig = {
        IPAddressAllow = [ "" ] ++ cfg.metrics.allowFrom;
        IPAddressDeny = [
          ""
          "any"
        ];
      };
    };

    systemd.services.${daemon} = {
      wantedBy = [ "multi-user.target" ];
      # NixOS's unit names. The package's After= names rabbitmq-server.service (Debian's; NixOS's
      # is rabbitmq.service) and postgresql.service, which NixOS has, but which is up before
      # postgresql-setup.service has created the database and roles: postgresql.target covers
      # both (nixos/modules/services/databases/postgresql.nix).
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
        # See `addresses` above: only the broker and database hosts, when known by address.
        IPAddressAllow = lib.mkIf (addresses != null && addresses != [ ]) addresses;
        IPAddressDeny = lib.mkIf (addresses != null) "any";
      };
    };

    networking.firewall.allowedTCPPorts = lib.optional cfg.metrics.openFirewall cfg.metrics.port;

    warnings =
      lib.optional (cfg.metrics.openFirewall && loopbackOnly) ''
        services.sistema-mensajes.${daemon}.metrics.openFirewall opens port ${toString cfg.metrics.port}, but
        metrics.allowFrom lists only loopback, so the socket drops every other host's connection: list
        the Prometheus host's addresses in services.sistema-mensajes.${daemon}.metrics.allowFrom.
      ''
      ++ lib.optional (cfg.metrics.openFirewall && cfg.metrics.basicAuthUsers != { } && !metricsTls) ''
        services.sistema-mensajes.${daemon}.metrics: basicAuthUsers without TLS (credentials.metrics-tls-cert and
        -key) on an open port: the scrape password crosses the network in plain text.
      ''
      ++
        lib.optional
          (
            given "postgres-tls-ca" && builtins.match ".*[?&]sslmode=verify-(ca|full)(&.*)?" postgresUrl == null
          )
          ''
            services.sistema-mensajes.${daemon}: credentials.postgres-tls-ca is set, but settings.postgres.url has no
            sslmode=verify-full (or verify-ca): with libpq's default, prefer, the consumer falls back to plain
            text when the server offers no TLS.
          '';
  };
}
