#!/bin/sh
# compose.yaml, profile clustered: a RabbitMQ node's healthcheck.  Healthy once this node
# accepts AMQP connections and every node that cluster.conf lists is a member of its cluster
# (running or not), so a node that formed a cluster of its own, because its peers were not
# up within cluster.conf's discovery retries, is never healthy and no worker starts on it.
set -eu
conf="${1:-/etc/rabbitmq/conf.d/30-cluster.conf}"
nodes=$(sed -n 's/^cluster_formation\.classic_config\.nodes\.[0-9][0-9]* *= *//p' "$conf")
if [ -z "$nodes" ]; then
  echo "health: $conf lists no cluster_formation.classic_config.nodes" >&2
  exit 1
fi
rabbitmq-diagnostics -q check_port_connectivity
status=$(rabbitmq-diagnostics -q cluster_status --formatter json)
for node in $nodes; do
  case "$status" in
    *"\"$node\""*) ;;
    *)
      echo "health: $node is not a member of this node's cluster" >&2
      exit 1
      ;;
  esac
done
