# Helpers for the modules in this folder (not a module).
{ lib }:
let
  inherit (lib)
    elemAt
    filter
    hasPrefix
    splitString
    ;

  # An option type whose check is loose and whose merge rejects bad values with a message that
  # names the option, the problem and the files that set it, never the value itself (a URL's
  # value may hold the very password being reported). `problem` returns null for a good value.
  strictType =
    {
      name,
      description,
      check,
      problem,
    }:
    lib.mkOptionType {
      inherit name description check;
      descriptionClass = "noun";
      merge =
        loc: defs:
        let
          value = lib.mergeEqualOption loc defs;
          why = problem value;
        in
        if why == null then
          value
        else
          throw "The option `${lib.showOption loc}' (set in ${lib.showFiles (lib.getFiles defs)}) ${why}";
    };

  inStore = s: builtins.hasContext s || hasPrefix "${builtins.storeDir}/" s;

  # scheme://authority/path?query#fragment, or null for anything else.
  urlParts =
    url:
    let
      m = builtins.match "([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(\\?([^#]*))?(#.*)?" url;
      authority = elemAt m 1;
      # The userinfo ends at the last "@" of the authority.
      at = builtins.match "(.*)@([^@]*)" authority;
      query = elemAt m 4;
    in
    if m == null then
      null
    else
      {
        userinfo = if at == null then null else elemAt at 0;
        hostport = if at == null then authority else elemAt at 1;
        # [ { key; value; } ], undecoded.
        query = map (
          kv:
          let
            p = builtins.match "([^=]*)(=(.*))?" kv;
          in
          {
            key = lib.toLower (elemAt p 0);
            value = if elemAt p 2 == null then "" else elemAt p 2;
          }
        ) (filter (kv: kv != "") (splitString "&" (if query == null then "" else query)));
      };

  # What a URL would put in the store besides its user name: null if nothing.
  urlPassword =
    url:
    let
      p = urlParts url;
    in
    # The daemons' URL parser strips whitespace and controls, and decodes query keys: anything this
    # check would read otherwise than they do is refused, not guessed at.
    if builtins.match "(.*[[:space:][:cntrl:]].*)" url != null then
      "whitespace or a control character (the daemon would strip it, and read what this check cannot)"
    else if p == null then
      "no `scheme://` form (a key=value string may hold `password=`)"
    else if p.userinfo != null && lib.hasInfix ":" p.userinfo then
      "a password after the user name (`user:password@host`)"
    else if lib.any (kv: lib.hasInfix "%" kv.key) p.query then
      "a percent-encoded query key (it may spell `password`)"
    else if lib.any (kv: lib.hasInfix "password" kv.key) p.query then
      "a `password=` query parameter"
    else if lib.hasInfix "#" url then
      "a `#` (percent-encode it as %23)"
    else
      null;

  # One host of a URL, as systemd's IPAddressAllow= would name it: an IP address, `localhost`,
  # "" for a Unix socket (no IP traffic), or null for a DNS name (unknown before it is resolved).
  hostAddress =
    host:
    if host == null then
      null
    else if hasPrefix "/" host || hasPrefix "%2F" host || hasPrefix "%2f" host then
      ""
    else if host == "localhost" then
      "localhost"
    else if builtins.match "[0-9]{1,3}(\\.[0-9]{1,3}){3}" host != null then
      host
    else if builtins.match "[0-9A-Fa-f]*:[0-9A-Fa-f:.]*" host != null then
      host
    else
      null;

  # host[:port] or [v6]:port -> the host.
  stripPort =
    hp:
    let
      v6 = builtins.match "\\[([^]]*)].*" hp;
    in
    if v6 != null then elemAt v6 0 else elemAt (builtins.match "([^:]*)(:.*)?" hp) 0;
in
rec {
  # A secret file's path: a string naming a file outside the Nix store. The store is readable by
  # every user of the host (and of any host the closure is copied to), so a secret must never be
  # a Nix path (`./amqp.pw`, copied there when used) or a store path (`"${./amqp.pw}"`,
  # `pkgs.writeText`). Every option of this type reaches its unit through LoadCredential=: PID 1
  # reads the file at start, as root, and the service reads its copy in $CREDENTIALS_DIRECTORY, so
  # the file may be readable by root only (sops-nix, agenix). No unit, whatever user it runs as,
  # reads the path itself: keep it so for every new option of this type.
  secretPath = strictType {
    name = "secretPath";
    description = "absolute path of a secret file outside the Nix store (a string, never a Nix path)";
    check = x: lib.isString x || lib.isPath x;
    problem =
      v:
      if lib.isPath v then
        "is a Nix path: it would be copied into the world-readable Nix store. Give the file's absolute path as a string, outside the store (e.g. \"/run/secrets/<name>\")."
      else if inStore v then
        "is a path in the world-readable Nix store (`\"\${./file}\"`, `pkgs.writeText` and the like put the secret there). Give the path of a file outside the store (e.g. \"/run/secrets/<name>\")."
      else if !(hasPrefix "/" v) then
        "is not an absolute path."
      else
        null;
  };

  # An optional secret file option (null: not set).
  secretFile =
    description:
    lib.mkOption {
      type = lib.types.nullOr secretPath;
      default = null;
      example = "/run/secrets/example";
      inherit description;
    };

  # A URL that holds no password: the daemons' settings become a TOML file in the world-readable
  # store. Passwords come from files (`password_file`) or systemd credentials instead.
  urlWithoutPassword = strictType {
    name = "urlWithoutPassword";
    description = "URL without a password";
    check = lib.isString;
    problem =
      v:
      let
        found = urlPassword v;
      in
      if found == null then
        null
      else
        "holds ${found}: the settings are written to the world-readable Nix store. Remove it from the URL and give the password as a file (the `credentials` options, or `password_file`).";
  };

  # The addresses a service connecting to these URLs needs (for IPAddressAllow=), or null when
  # some host is a DNS name, which only resolving at run time would tell. A PostgreSQL URL may
  # name several hosts, in the authority (`h1:5432,h2:5432`) and in `host=`/`hostaddr=` query
  # parameters (libpq's); all of them count. A Unix socket (a path as the host) needs none.
  urlAddresses =
    urls:
    let
      hosts =
        url:
        let
          p = urlParts url;
        in
        if p == null then
          [ null ]
        else
          map stripPort (filter (h: h != "") (splitString "," p.hostport))
          ++ lib.concatMap (kv: splitString "," kv.value) (
            filter (kv: kv.key == "host" || kv.key == "hostaddr") p.query
          );
      addresses = map hostAddress (lib.concatMap hosts urls);
    in
    if lib.elem null addresses then null else lib.unique (filter (a: a != "") addresses);

  # An entry of IPAddressAllow= (systemd.resource-control(5)): an address with an optional
  # prefix length, or one of systemd's symbolic names.
  ipAddressPrefix =
    lib.types.strMatching "any|localhost|link-local|multicast|[0-9A-Fa-f:.]+(/[0-9]{1,3})?"
    // {
      description = "IP address or network (address/prefix length), or `localhost`, `link-local`, `multicast`, `any`";
    };

  # Loopback, as the metrics sockets allow it by default.
  loopback = [
    "127.0.0.0/8"
    "::1"
  ];

  # An address something listens on, to connect to from this host: the wildcards become
  # 127.0.0.1.
  connectAddress =
    address:
    if
      lib.elem address [
        ""
        "0.0.0.0"
        "::"
        "[::]"
      ]
    then
      "127.0.0.1"
    else
      address;

  # Whether a listening address is loopback or a wildcard (reached from this host over loopback).
  isLocal =
    address:
    connectAddress address == "127.0.0.1"
    || hasPrefix "127." address
    || address == "::1"
    || address == "localhost";

  # host:port as both systemd's ListenStream= and the daemons' `metrics.listen` parse it.
  hostPort =
    address: port:
    if lib.hasInfix ":" address then "[${address}]:${toString port}" else "${address}:${toString port}";
}
