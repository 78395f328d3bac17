# Sourced by scripts/* and .ci/*: small shell helpers written once.

# port_open PORT: something answers on 127.0.0.1:PORT.
port_open() { timeout 1 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls every 0.5 s until COMMAND succeeds.
wait_for() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  while ! "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then echo "timed out after ${limit}s waiting for $what" >&2; return 1; fi
    sleep 0.5
  done
}

# need_apt COMMAND:PACKAGE...: installs (Debian) the packages whose command is missing.
need_apt() {
  local missing=()
  for spec in "$@"; do command -v "${spec%%:*}" >/dev/null || missing+=("${spec#*:}"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "missing: ${missing[*]} (Debian's packages; install them as root, or put their programs on the PATH)" >&2
      return 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# need_pika: Debian's python3-pika for /usr/bin/python3 (the CI scripts' independent AMQP client).
need_pika() {
  /usr/bin/python3 -c 'import pika' 2>/dev/null && return 0
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pika >/dev/null
}
