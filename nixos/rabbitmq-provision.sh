#!/usr/bin/env bash
# Creates sistema-mensajes' RabbitMQ users, one per daemon, with permissions limited to the
# pipeline's exchange and queue names. Idempotent: run it at every boot (the NixOS module does, as
# the unit sistema-mensajes-rabbitmq-provision.service) or by hand on any host with rabbitmqctl.
#
#   rabbitmq-provision.sh [options] ROLE:USER:PASSWORD_FILE...
#
# ROLE is `producer`, `consumer`, `topology` or `replay`. PASSWORD_FILE holds the user's password; if it does not exist
# and --generate is given, a random password is written there first (mode 0600). The password is
# passed to rabbitmqctl on stdin, never on a command line.
#
# Options (defaults are the daemons' defaults):
#   --vhost V                 virtual host (/)
#   --exchange X              direct exchange (weather)
#   --queue Q                 queue (weather_queue)
#   --dead-letter-exchange X  (weather_dead_letter)
#   --dead-letter-queue Q     (weather_dead_letter)
#   --generate                create missing password files
#   --delete-guest            delete the `guest` user RabbitMQ creates on a fresh node
#   --rabbitmqctl PATH        rabbitmqctl to run (rabbitmqctl from PATH)
#   --delivery-limit N        the policy `sistema-mensajes-delivery-limit-QUEUE` on the queue (for a
#                             quorum queue): after N returns RabbitMQ dead-letters a message to
#                             the dead-letter exchange, at least once, instead of redelivering it
#                             forever (RabbitMQ 3.x) or dropping it after 20 (4.x with no DLX).
#                             A policy, not queue arguments: it applies to a queue that exists.
#                             With this option, ROLE:USER:PASSWORD_FILE may be left out.
#
# Permissions (https://www.rabbitmq.com/docs/access-control, regular expressions on names). The
# daemons then run with `amqp.declare = false`: they only check passively that the objects exist,
# which needs no permission, and `consumer declare-topology`, as the topology user, declares them.
#   producer: write the exchange (publish); nothing else: it cannot consume, declare or delete.
#   consumer: read the queue (consume), write the dead-letter exchange (republish a rejected
#             message there); it cannot publish readings nor declare or delete anything.
#   topology: configure all four names (declare), write the queues and read the exchanges (bind
#             one to the other); for `consumer declare-topology`, run by the provisioning step.
#   replay:   read the dead-letter queue, write the exchange: `consumer replay-dead-letters`.
set -euo pipefail

vhost=/ exchange=weather queue=weather_queue dlx=weather_dead_letter dlq=weather_dead_letter
generate=0 delete_guest=0 ctl=rabbitmqctl delivery_limit=
specs=()
while [ $# -gt 0 ]; do
  case $1 in
    --vhost) vhost=$2; shift 2 ;;
    --exchange) exchange=$2; shift 2 ;;
    --queue) queue=$2; shift 2 ;;
    --dead-letter-exchange) dlx=$2; shift 2 ;;
    --dead-letter-queue) dlq=$2; shift 2 ;;
    --generate) generate=1; shift ;;
    --delete-guest) delete_guest=1; shift ;;
    --rabbitmqctl) ctl=$2; shift 2 ;;
    --delivery-limit) delivery_limit=$2; shift 2 ;;
    -h | --help) sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "rabbitmq-provision: unknown option $1" >&2; exit 2 ;;
    *) specs+=("$1"); shift ;;
  esac
done
if [ ${#specs[@]} -eq 0 ] && [ -z "$delivery_limit" ]; then
  echo "rabbitmq-provision: no ROLE:USER:PASSWORD_FILE given" >&2
  exit 2
fi

# A name as a regular expression matching exactly it.
quote() { printf '%s' "$1" | sed 's/[][\\.^$*+?(){}|]/\\&/g'; }
alt() { # names... -> ^(a|b)$
  local out='' n
  while IFS= read -r n; do out+="${out:+|}$(quote "$n")"; done < <(printf '%s\n' "$@" | sort -u)
  printf '^(%s)$' "$out"
}

ctl() { "$ctl" --quiet "$@"; }

# The file's content minus one trailing newline, as the daemons read it (src/secret.rs).
password() {
  local p
  p=$(cat -- "$1" && printf x)
  p=${p%x}
  printf '%s' "${p%$'\n'}"
}

user_exists() {
  # grep reads to the end: with -q it would stop at the match, and under pipefail
  # rabbitmqctl's write to the closed pipe would make an existing user look absent.
  ctl list_users --no-table-headers | cut -f1 | grep -xF -- "$1" >/dev/null
}

for spec in "${specs[@]+"${specs[@]}"}"; do
  IFS=: read -r role user file <<<"$spec"
  if [ -z "$role" ] || [ -z "$user" ] || [ -z "$file" ]; then
    echo "rabbitmq-provision: bad argument '$spec' (want ROLE:USER:PASSWORD_FILE)" >&2
    exit 2
  fi
  case $role in
    producer) configure='^$' write=$(alt "$exchange") read='^$' ;;
    consumer) configure='^$' write=$(alt "$dlx") read=$(alt "$queue") ;;
    topology)
      configure=$(alt "$exchange" "$queue" "$dlx" "$dlq")
      write=$(alt "$queue" "$dlq")
      read=$(alt "$exchange" "$dlx")
      ;;
    replay)
      configure='^$' write=$(alt "$exchange") read=$(alt "$dlq")
      # Patterns match names of any kind: read on the queue would also be read on an exchange of
      # the same name, enough to bind it to the readings' exchange (docs/security.md).
      if [ "$dlx" = "$dlq" ]; then
        echo "rabbitmq-provision: warning: the dead-letter exchange and queue share the name '$dlq'; $user may bind the exchange to '$exchange'. Give them different names." >&2
      fi
      ;;
    *) echo "rabbitmq-provision: unknown role '$role' (producer, consumer, topology or replay)" >&2; exit 2 ;;
  esac

  if [ ! -e "$file" ]; then
    if [ "$generate" = 1 ]; then
      (umask 077 && mkdir -p "$(dirname "$file")" \
        && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$file.tmp" && mv "$file.tmp" "$file")
      echo "generated a password for $user in $file"
    else
      echo "rabbitmq-provision: $file does not exist (use --generate to create it)" >&2
      exit 1
    fi
  fi
  if [ ! -s "$file" ]; then
    echo "rabbitmq-provision: $file is empty" >&2
    exit 1
  fi

  # The password goes on stdin: rabbitmqctl reads it there when the argument is left out.
  if user_exists "$user"; then
    password "$file" | ctl change_password "$user" >/dev/null
  else
    password "$file" | ctl add_user "$user" >/dev/null
  fi
  ctl set_user_tags "$user" >/dev/null
  ctl set_permissions -p "$vhost" "$user" "$configure" "$write" "$read" >/dev/null
  echo "$user ($role) on vhost $vhost: configure $configure, write $write, read $read"
done

if [ -n "$delivery_limit" ]; then
  case $delivery_limit in
    *[!0-9]* | '' | 0*) echo "rabbitmq-provision: --delivery-limit $delivery_limit is not a positive integer" >&2; exit 2 ;;
  esac
  json() { printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"]/\\&/g')"; }
  # at-least-once: the message leaves the queue only once the dead-letter queue has it (it needs
  # overflow reject-publish; with no length limit set, that changes nothing else). `queues`, not
  # `quorum_queues` (RabbitMQ 3.12+): a classic queue ignores delivery-limit, and our consumer
  # never rejects, so the dead-letter exchange is not used for it.
  definition="{\"delivery-limit\":$delivery_limit,\"dead-letter-exchange\":$(json "$dlx"),\"dead-letter-strategy\":\"at-least-once\",\"overflow\":\"reject-publish\"}"
  ctl set_policy -p "$vhost" --apply-to queues "sistema-mensajes-delivery-limit-$queue" "$(alt "$queue")" "$definition" >/dev/null
  echo "policy sistema-mensajes-delivery-limit-$queue on $queue: $definition"
fi

if [ "$delete_guest" = 1 ] && user_exists guest; then
  ctl delete_user guest >/dev/null
  echo "deleted the guest user"
fi
