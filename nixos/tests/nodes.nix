# The VM tests' node configurations, written once: nixos/tests/{one-host,split}.nix run them,
# and .ci/check-nix evaluates each with the offline module evaluator. Each node is a NixOS module.
let
  # Test secrets: files under /etc/sistema-test/ (environment.etc), since the modules refuse a
  # secret in the Nix store. Root's, mode 0400, as sops-nix or agenix leave a secret, so that the
  # tests fail if a unit reads a secret file as its own user instead of getting it as a credential
  # (LoadCredential=, which PID 1 reads as root). In a VM test their text is in the store anyway
  # (`text` is copied from there): fine in a test only. On a real host, point the same options at
  # files that never pass through the store (/run/secrets/..., written by a secrets manager).
  # environment.etc.<name>.mode: "If set to something else than `symlink`, the file is copied
  # instead of symlinked, with the given file mode"; uid and gid default to 0
  # (nixos/modules/system/etc/etc.nix).
  secret = name: "/etc/sistema-test/${name}";
  secretFiles = names: {
    environment.etc = builtins.listToAttrs (
      map (name: {
        name = "sistema-test/${name}";
        value = {
          text = texts.${name};
          mode = "0400";
        };
      }) names
    );
  };
  texts = {
    grafana-admin-password = "snakeoil-admin";
    grafana-secret-key = "snakeoil-secret-key";
    producer-amqp-password = "snakeoil-producer";
    consumer-amqp-password = "snakeoil-consumer";
    weather-writer-password = "snakeoil-writer";
    weather-owner-password = "snakeoil-owner";
  };

  grafana = {
    adminPasswordFile = secret "grafana-admin-password";
    secretKeyFile = secret "grafana-secret-key";
  };

  # The split test's network: vlan 1, where node N of the test (in name order: backend 1,
  # consumer1 2, consumer2 3, producer 4) is 192.168.1.N and 2001:db8:1::N
  # (nixos/lib/testing/network.nix). The backend runs Prometheus.
  backendAddresses = [
    "192.168.1.1"
    "2001:db8:1::1"
  ];
  # A remote daemon's /metrics: reachable from the network, open to loopback (the tests curl it
  # locally) and to the backend's Prometheus, not to the other nodes.
  metrics = {
    listenAddress = "0.0.0.0";
    openFirewall = true;
    allowFrom = [
      "127.0.0.0/8"
      "::1"
    ]
    ++ backendAddresses;
  };
  testNetwork = [
    "192.168.1.0/24"
    "2001:db8:1::/64"
  ];

  # A consumer on its own host: remote broker and database, with passwords, as the writer role.
  # The backend declares the topology and applies the migrations, so this one does neither. A
  # short AMQP heartbeat, so the broker notices a crashed consumer host soon and requeues its
  # deliveries. `backend` names the hosts by name (the service may then reach any address) or
  # by address (its IP access list is pinned to them).
  consumerHost = backend: {
    imports = [
      (secretFiles [
        "consumer-amqp-password"
        "weather-writer-password"
      ])
    ];
    services.sistema-mensajes.consumer = {
      enable = true;
      settings = {
        amqp = {
          url = "amqp://sistema-consumer@${backend}:5672/%2f?heartbeat=5";
          declare = false;
        };
        postgres = {
          url = "postgres://weather_writer@${backend}:5432/weather";
          migrate = false;
        };
      };
      credentials = {
        amqp-password = secret "consumer-amqp-password";
        postgres-password = secret "weather-writer-password";
      };
      inherit metrics;
    };
  };
in
{
  # Everything on one host, with the defaults: peer authentication, generated broker passwords.
  machine = {
    imports = [
      (secretFiles [
        "grafana-admin-password"
        "grafana-secret-key"
      ])
    ];
    services.sistema-mensajes = {
      stack = {
        enable = true;
        inherit grafana;
      };
      producer = {
        enable = true;
        settings.simulation = {
          stations = 5;
          rate = 20.0;
        };
      };
      consumer.enable = true;
    };
  };

  # Split: the broker, the database and the monitoring on one host...
  backend = {
    imports = [
      (secretFiles [
        "grafana-admin-password"
        "grafana-secret-key"
        "producer-amqp-password"
        "consumer-amqp-password"
        "weather-writer-password"
        "weather-owner-password"
      ])
    ];
    services.sistema-mensajes.stack = {
      enable = true;
      inherit grafana;
      rabbitmq = {
        listenAddress = "0.0.0.0";
        openFirewall = true;
        users = {
          producer.passwordFile = secret "producer-amqp-password";
          consumer.passwordFile = secret "consumer-amqp-password";
        };
      };
      postgresql.tcp = {
        enable = true;
        writerPasswordFile = secret "weather-writer-password";
        ownerPasswordFile = secret "weather-owner-password";
        allowFrom = testNetwork;
        openFirewall = true;
      };
      prometheus.targets = {
        producer = [ "producer:9101" ];
        consumer = [
          "consumer1:9102"
          "consumer2:9102"
        ];
      };
    };
  };

  # ...two consumer hosts, one naming the backend by name, one by address...
  consumer1 = consumerHost "backend";
  consumer2 = consumerHost (builtins.head backendAddresses);

  # ...and a producer host.
  producer = {
    imports = [ (secretFiles [ "producer-amqp-password" ]) ];
    services.sistema-mensajes.producer = {
      enable = true;
      settings = {
        amqp = {
          url = "amqp://sistema-producer@backend:5672/%2f";
          declare = false;
        };
        simulation = {
          stations = 10;
          rate = 50.0;
        };
      };
      credentials.amqp-password = secret "producer-amqp-password";
      inherit metrics;
    };
  };
}
