#!/bin/sh
# compose.yaml, profile clustered: each RabbitMQ node starts with
#   sh cookie-entrypoint.sh SECRET COMMAND...
# It installs the cluster's shared Erlang cookie, the compose secret mounted at SECRET (the
# host's deploy/rabbitmq/erlang.cookie), as the node's $HOME/.erlang.cookie, readable by its
# owner only, then runs COMMAND.  The image's docker-entrypoint.sh gives the file to the
# rabbitmq user with the rest of /var/lib/rabbitmq.  The cookie is never in the environment
# or on a command line, and it is copied at every start, so a new secret reaches a node that
# already has data.
set -eu
secret=$1
shift
cookie="$HOME/.erlang.cookie"
if [ ! -f "$secret" ]; then
  echo "cookie: no Erlang cookie at $secret: create it on the host with" \
    "\`openssl rand -hex 32 > deploy/rabbitmq/erlang.cookie\`" >&2
  exit 1
fi
value=$(tr -d '\r\n' < "$secret")
if [ "${#value}" -lt 20 ] || printf '%s' "$value" | LC_ALL=C grep -q '[^!-~]'; then
  echo "cookie: $secret must hold one word of at least 20 printable characters" \
    "(openssl rand -hex 32)" >&2
  exit 1
fi
umask 077
printf '%s' "$value" > "$cookie.new"
chmod 400 "$cookie.new"
mv -f "$cookie.new" "$cookie"
exec "$@"
