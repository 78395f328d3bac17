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
    metrics-scrape-password = "snakeoil-scrape";
    # A test PKI (openssl, EC P-256, valid for 100 years): the CA, the backend's certificate for
    # `backend` and 192.168.1.1 (consumer2 names it by address), and each daemon host's for its
    # /metrics. Snakeoil: the keys are in the store, as every test secret here.
    tls-ca = ''
      -----BEGIN CERTIFICATE-----
      MIIBpDCCAUmgAwIBAgIUKyh30ityN37N6TE36Mpnl9NPH3EwCgYIKoZIzj0EAwIw
      JjEkMCIGA1UEAwwbc2lzdGVtYS1tZW5zYWplcyBWTSB0ZXN0IENBMCAXDTI2MTIw
      NDIxMTUzNloYDzIxMjYxMTEwMjExNTM2WjAmMSQwIgYDVQQDDBtzaXN0ZW1hLW1l
      bnNhamVzIFZNIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAT+g2Cg
      q4l/ADx3Kcr7yLAM6atQd1u6kSvLuhuIUzGwZ5AF9Q50l7/Qma3tV/Fmt8XaM83T
      +kMkoEwy+t6wDGKAo1MwUTAdBgNVHQ4EFgQU9EXJ1+gX4ubphBRTqGpcJT1ZCNEw
      HwYDVR0jBBgwFoAU9EXJ1+gX4ubphBRTqGpcJT1ZCNEwDwYDVR0TAQH/BAUwAwEB
      /zAKBggqhkjOPQQDAgNJADBGAiEA7J41ggVFcmmATg4SoRNUJxRpW/6NtaA0PQzr
      2hCmw1YCIQDWyKhrI+XvVRSAn7DqEPB9+kjsd+KGdNJWW0xsasUaXg==
      -----END CERTIFICATE-----
    '';
    backend-tls-cert = ''
      -----BEGIN CERTIFICATE-----
      MIIBuTCCAV6gAwIBAgIUdoggEBA2ghmVaVW0gr6/YT/ngF4wCgYIKoZIzj0EAwIw
      JjEkMCIGA1UEAwwbc2lzdGVtYS1tZW5zYWplcyBWTSB0ZXN0IENBMCAXDTI2MTIw
      NDIxMTUzNloYDzIxMjYxMTEwMjExNTM2WjASMRAwDgYDVQQDDAdiYWNrZW5kMFkw
      EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEyar5wA3/vDX0pQO15myzYNAoGHlfwA2f
      bWQR55b8noGrB+SG5dKWB7ito+tyRMtIZvu83PZyr3hmQs7PbRcsHKN8MHowGAYD
      VR0RBBEwD4IHYmFja2VuZIcEwKgBATATBgNVHSUEDDAKBggrBgEFBQcDATAJBgNV
      HRMEAjAAMB0GA1UdDgQWBBTkLJGZUewGvS9KlaWaokkBv2DxsDAfBgNVHSMEGDAW
      gBT0RcnX6Bfi5umEFFOoalwlPVkI0TAKBggqhkjOPQQDAgNJADBGAiEA7Q0v6rsx
      lOaKylCbaVUdGCbG9zkiXDqnm2cM4CABm0ECIQDMXp94xMUrUlmaFx9vdab0P1Hf
      NQ02/Pl79l7Ca5oGxQ==
      -----END CERTIFICATE-----
    '';
    backend-tls-key = ''
      -----BEGIN PRIVATE KEY-----
      MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJXLoT/dO71Leqywz
      ggK92bnDGKKik9SfkI5F5of8XlShRANCAATJqvnADf+8NfSlA7XmbLNg0CgYeV/A
      DZ9tZBHnlvyegasH5Ibl0pYHuK2j63JEy0hm+7zc9nKveGZCzs9tFywc
      -----END PRIVATE KEY-----
    '';
    consumer1-tls-cert = ''
      -----BEGIN CERTIFICATE-----
      MIIBtjCCAVygAwIBAgIUdoggEBA2ghmVaVW0gr6/YT/ngF8wCgYIKoZIzj0EAwIw
      JjEkMCIGA1UEAwwbc2lzdGVtYS1tZW5zYWplcyBWTSB0ZXN0IENBMCAXDTI2MTIw
      NDIxMTUzNloYDzIxMjYxMTEwMjExNTM2WjAUMRIwEAYDVQQDDAljb25zdW1lcjEw
      WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQo6FGe+e75fjkGgA6PuLAFBmY4kuC6
      3bArnaTuj+HbgeuPv5GoOu1i24RMBIDJDriVsGbKBdf4pGX665rqq/jKo3gwdjAU
      BgNVHREEDTALggljb25zdW1lcjEwEwYDVR0lBAwwCgYIKwYBBQUHAwEwCQYDVR0T
      BAIwADAdBgNVHQ4EFgQUbF8HUOVMtp7ynBlB62D5lvVcH0YwHwYDVR0jBBgwFoAU
      9EXJ1+gX4ubphBRTqGpcJT1ZCNEwCgYIKoZIzj0EAwIDSAAwRQIgbGMDCHCG8ZyR
      D8UKp3wdFZ+Ofv3iTEu7Q/qpuon8UYUCIQCwohHRQdgOi6ds7qj8pnOj5PkQJnx/
      tHl8UCKFMpGjAg==
      -----END CERTIFICATE-----
    '';
    consumer1-tls-key = ''
      -----BEGIN PRIVATE KEY-----
      MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgqkKUp8RUNnFpaun7
      /1t1IHJq+VugRLwSHegHAQSu0xehRANCAAQo6FGe+e75fjkGgA6PuLAFBmY4kuC6
      3bArnaTuj+HbgeuPv5GoOu1i24RMBIDJDriVsGbKBdf4pGX665rqq/jK
      -----END PRIVATE KEY-----
    '';
    consumer2-tls-cert = ''
      -----BEGIN CERTIFICATE-----
      MIIBtzCCAVygAwIBAgIUdoggEBA2ghmVaVW0gr6/YT/ngGAwCgYIKoZIzj0EAwIw
      JjEkMCIGA1UEAwwbc2lzdGVtYS1tZW5zYWplcyBWTSB0ZXN0IENBMCAXDTI2MTIw
      NDIxMTUzNloYDzIxMjYxMTEwMjExNTM2WjAUMRIwEAYDVQQDDAljb25zdW1lcjIw
      WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATa6rlL2CTM8uO3lJT3IQyVrdmmPnI+
      ArRPxUrA25hc+2HJm5h2Yj7AEBeeguo7XpyCFbOh6HKcoAwTTlMUa+ajo3gwdjAU
      BgNVHREEDTALggljb25zdW1lcjIwEwYDVR0lBAwwCgYIKwYBBQUHAwEwCQYDVR0T
      BAIwADAdBgNVHQ4EFgQUvL4AM7U44deEp0X9vq5J66/Kq64wHwYDVR0jBBgwFoAU
      9EXJ1+gX4ubphBRTqGpcJT1ZCNEwCgYIKoZIzj0EAwIDSQAwRgIhAPE/qRdbblAR
      uLWwRF5Ucyt0BNAFDqtFKzEGpBj7d25WAiEAsmAXIA59a311fVwei39kCFAGZr3q
      9LNtgo4coVfet8I=
      -----END CERTIFICATE-----
    '';
    consumer2-tls-key = ''
      -----BEGIN PRIVATE KEY-----
      MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgX3l+B5gLskxSfEJc
      c8j+QJlwdXnfCJm/PF743It4kZyhRANCAATa6rlL2CTM8uO3lJT3IQyVrdmmPnI+
      ArRPxUrA25hc+2HJm5h2Yj7AEBeeguo7XpyCFbOh6HKcoAwTTlMUa+aj
      -----END PRIVATE KEY-----
    '';
    producer-tls-cert = ''
      -----BEGIN CERTIFICATE-----
      MIIBtTCCAVqgAwIBAgIUdoggEBA2ghmVaVW0gr6/YT/ngGEwCgYIKoZIzj0EAwIw
      JjEkMCIGA1UEAwwbc2lzdGVtYS1tZW5zYWplcyBWTSB0ZXN0IENBMCAXDTI2MTIw
      NDIxMTUzNloYDzIxMjYxMTEwMjExNTM2WjATMREwDwYDVQQDDAhwcm9kdWNlcjBZ
      MBMGByqGSM49AgEGCCqGSM49AwEHA0IABGDoj+581CDiI6vUHkMdod8g366/ATMB
      DKTuVXopSCE5IJvLlZm06DyVbUhbts0aslEfw3VdDCIhRBUjd3Y/EZajdzB1MBMG
      A1UdEQQMMAqCCHByb2R1Y2VyMBMGA1UdJQQMMAoGCCsGAQUFBwMBMAkGA1UdEwQC
      MAAwHQYDVR0OBBYEFONfABmnNu7G2dp1tPQ4igJ7Uf4/MB8GA1UdIwQYMBaAFPRF
      ydfoF+Lm6YQUU6hqXCU9WQjRMAoGCCqGSM49BAMCA0kAMEYCIQC9iJzKLoPabWok
      LOZODi3LfXq9YVdnUJyC8Si+RpZ5XgIhALs8m47rJ7nClaYoPfLbMoBMa3Vjz1pD
      Tal6hqWeUsDu
      -----END CERTIFICATE-----
    '';
    producer-tls-key = ''
      -----BEGIN PRIVATE KEY-----
      MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgk9aS/tE1vStqddS6
      tTeh3xqvRr9WIY12psBwJ96sHIChRANCAARg6I/ufNQg4iOr1B5DHaHfIN+uvwEz
      AQyk7lV6KUghOSCby5WZtOg8lW1IW7bNGrJRH8N1XQwiIUQVI3d2PxGW
      -----END PRIVATE KEY-----
    '';
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
  # locally) and to the backend's Prometheus, not to the other nodes; over TLS with the host's
  # certificate, for the user `prometheus` only (bcrypt of metrics-scrape-password).
  metrics = {
    listenAddress = "0.0.0.0";
    openFirewall = true;
    allowFrom = [
      "127.0.0.0/8"
      "::1"
    ]
    ++ backendAddresses;
    basicAuthUsers.prometheus = "$2b$10$Iwtfg9wyqAHowaicJUbuG.7yAq5ubxYRquBMmaDEvI5b/XOlbJzFm";
  };
  # The files a daemon host needs for TLS: the CA (the broker's and the database's certificates),
  # and its own certificate and key for /metrics.
  tlsFiles = host: [
    "tls-ca"
    "${host}-tls-cert"
    "${host}-tls-key"
  ];
  tlsCredentials = host: {
    amqp-tls-ca = secret "tls-ca";
    metrics-tls-cert = secret "${host}-tls-cert";
    metrics-tls-key = secret "${host}-tls-key";
  };
  testNetwork = [
    "192.168.1.0/24"
    "2001:db8:1::/64"
  ];

  # A consumer on its own host: remote broker and database over TLS only (the server certificates
  # checked, name included), with passwords, as the writer role. The backend declares the topology
  # and applies the migrations, so this one does neither. A short AMQP heartbeat, so the broker
  # notices a crashed consumer host soon and requeues its deliveries. `backend` names the hosts by
  # name (the service may then reach any address) or by address (its IP access list is pinned to
  # them; the backend's certificate holds the address too).
  consumerHost = host: backend: {
    imports = [
      (secretFiles (
        [
          "consumer-amqp-password"
          "weather-writer-password"
        ]
        ++ tlsFiles host
      ))
    ];
    services.sistema-mensajes.consumer = {
      enable = true;
      settings = {
        amqp = {
          url = "amqps://sistema-consumer@${backend}:5671/%2f?heartbeat=5";
          declare = false;
        };
        postgres = {
          url = "postgres://weather_writer@${backend}:5432/weather?sslmode=verify-full";
          migrate = false;
        };
      };
      credentials = {
        amqp-password = secret "consumer-amqp-password";
        postgres-password = secret "weather-writer-password";
        postgres-tls-ca = secret "tls-ca";
      }
      // tlsCredentials host;
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
      consumer = {
        enable = true;
        # Readings older than 400 days go (the maintain timer drops their daily partitions).
        settings.postgres.retention = "400d";
      };
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
        "metrics-scrape-password"
        "tls-ca"
        "backend-tls-cert"
        "backend-tls-key"
      ])
    ];
    services.sistema-mensajes.stack = {
      enable = true;
      inherit grafana;
      # Other hosts reach the broker and the database over TLS only.
      tls = {
        caFile = secret "tls-ca";
        certFile = secret "backend-tls-cert";
        keyFile = secret "backend-tls-key";
      };
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
      prometheus.daemonScrape = {
        caFile = secret "tls-ca";
        username = "prometheus";
        passwordFile = secret "metrics-scrape-password";
      };
    };
  };

  # ...two consumer hosts, one naming the backend by name, one by address...
  consumer1 = consumerHost "consumer1" "backend";
  consumer2 = consumerHost "consumer2" (builtins.head backendAddresses);

  # ...and a producer host.
  producer = {
    imports = [ (secretFiles ([ "producer-amqp-password" ] ++ tlsFiles "producer")) ];
    services.sistema-mensajes.producer = {
      enable = true;
      settings = {
        amqp = {
          url = "amqps://sistema-producer@backend:5671/%2f";
          declare = false;
        };
        simulation = {
          stations = 10;
          rate = 50.0;
        };
      };
      credentials = {
        amqp-password = secret "producer-amqp-password";
      }
      // tlsCredentials "producer";
      inherit metrics;
    };
  };
}
