# The cluster stack of `scripts/services up --cluster`, sourced by scripts/services (it uses its
# helpers: spawn, our_pid, wait_for, stop_pid, secret, log, die).
#
#   - Apache ZooKeeper 3.9 (one server), which ClickHouse 18.16's replicated tables and ON CLUSTER
#     DDL coordinate through;
#   - 3 Kafka brokers in one KRaft cluster (each broker and controller), internal topics at
#     replication factor 3, min.insync.replicas 2;
#   - 4 ClickHouse 18.16 servers: 2 shards of 2 replicas, cluster `cdc_relay`.
#
# Everything on loopback, ports of its own (none shared with the single-node stack, which can run
# beside it), data under .local/cluster. `stop kafka-N` / `stop clickhouse-N` stop one node (fault
# tests), `kill kafka-N` / `kill clickhouse-N` kill one with -9; `up --cluster` starts whatever
# is down again.

CLUSTER_DIR=$LOCAL/cluster
CLUSTER_NAME=cdc_relay
ZK_VERSION=$(sed -n 's:.*<zookeeper.version>\(.*\)</zookeeper.version>.*:\1:p' "$ROOT/scripts/zookeeper/pom.xml")
ZK_LIBS=$CACHE/zookeeper-$ZK_VERSION/libs
ZK_PORT=${CDC_RELAY_ZOOKEEPER_PORT:-12181}
ZK_DIR=$CLUSTER_DIR/zookeeper
KAFKA_NODES="1 2 3"
CH_NODES="1 2 3 4"

# Broker N: client port 19092 + 100 N, controller port 19093 + 100 N.
cluster_kafka_port() { echo $((19092 + 100 * $1)); }
cluster_controller_port() { echo $((19093 + 100 * $1)); }
# ClickHouse node N: HTTP 18123 + 100 N, native 19000 + 100 N, interserver 19009 + 100 N.
# Nodes 1 and 2 are shard 1's replicas, 3 and 4 shard 2's.
cluster_ch_http_port() { echo $((18123 + 100 * $1)); }
cluster_ch_tcp_port() { echo $((19000 + 100 * $1)); }
cluster_ch_interserver_port() { echo $((19009 + 100 * $1)); }
cluster_ch_shard() { echo $((($1 + 1) / 2)); }

cluster_install() {
  [ -f "$ZK_LIBS/.complete" ] && return 0
  command -v mvn >/dev/null || apt_install maven
  log "resolving Apache ZooKeeper $ZK_VERSION from Maven Central into $ZK_LIBS"
  rm -rf "$ZK_LIBS"; mkdir -p "$ZK_LIBS"
  (cd "$ROOT/scripts/zookeeper" && mvn -q -B dependency:copy-dependencies \
    -DoutputDirectory="$ZK_LIBS" -DincludeScope=runtime) || die "maven could not resolve zookeeper:$ZK_VERSION"
  touch "$ZK_LIBS/.complete"
}

# A readiness probe runs with its output discarded (wait_for); a server that died says so on the
# stderr `up` was started with (fd 3, opened in scripts/services), not silently.
probe_died() { # name logfile
  { tail -n 40 "$2"; printf '[services] error: %s exited (see %s)\n' "$1" "$2"; } >&3 2>/dev/null || true
  exit 1
}

# --- ZooKeeper -------------------------------------------------------------------------------------

zk_up() {
  mkdir -p "$ZK_DIR/data"
  cat >"$ZK_DIR/zoo.cfg" <<EOF
dataDir=$ZK_DIR/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
tickTime=2000
initLimit=10
syncLimit=5
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
autopurge.purgeInterval=1
EOF
  cat >"$ZK_DIR/logback.xml" <<'EOF'
<configuration>
  <appender name="out" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d{ISO8601} %-5level %msg \(%logger{0}\)%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="out"/></root>
</configuration>
EOF
  if our_pid "$ZK_DIR/zookeeper.pid" "$ZK_DIR/zoo.cfg" >/dev/null; then
    wait_for zookeeper 60 "$ZK_DIR/zookeeper.log" zk_ready
    return 0
  fi
  port_open "$ZK_PORT" && die "port $ZK_PORT is taken by another process (set CDC_RELAY_ZOOKEEPER_PORT)"
  spawn "$ZK_DIR/zookeeper.pid" "$ZK_DIR/zookeeper.log" "$ZK_DIR" \
    java -Xms64m -Xmx256m -Djava.awt.headless=true -Dlogback.configurationFile="$ZK_DIR/logback.xml" \
    -cp "$ZK_LIBS/*" org.apache.zookeeper.server.quorum.QuorumPeerMain "$ZK_DIR/zoo.cfg"
  wait_for zookeeper 60 "$ZK_DIR/zookeeper.log" zk_ready
}

zk_ready() {
  our_pid "$ZK_DIR/zookeeper.pid" "$ZK_DIR/zoo.cfg" >/dev/null || probe_died zookeeper "$ZK_DIR/zookeeper.log"
  # `ruok` answers imok even while the server failed to load its data; `srvr` names a mode only
  # once it serves.
  local answer
  answer=$( (exec 5<>"/dev/tcp/127.0.0.1/$ZK_PORT" && printf srvr >&5 && timeout 2 cat <&5) 2>/dev/null) || true
  [[ "$answer" == *"Mode: standalone"* ]]
}

# --- Kafka brokers ---------------------------------------------------------------------------------

cluster_kafka_java() { # node
  echo "java -Xms128m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true -Dlog4j2.configurationFile=$CLUSTER_DIR/kafka-$1/log4j2.properties"
}

cluster_kafka_up() {
  local n voters="" cluster_id_file=$CLUSTER_DIR/kafka-cluster-id cluster_id
  mkdir -p "$CLUSTER_DIR"
  [ -s "$cluster_id_file" ] || kafka_cluster_id >"$cluster_id_file"
  cluster_id=$(cat "$cluster_id_file")
  for n in $KAFKA_NODES; do voters="$voters${voters:+,}$n@127.0.0.1:$(cluster_controller_port "$n")"; done
  for n in $KAFKA_NODES; do
    local dir=$CLUSTER_DIR/kafka-$n port ctl
    port=$(cluster_kafka_port "$n"); ctl=$(cluster_controller_port "$n")
    mkdir -p "$dir"
    cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=3
default.replication.factor=3
min.insync.replicas=2
auto.create.topics.enable=false
offsets.topic.replication.factor=3
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
unclean.leader.election.enable=false
EOF
    kafka_log4j >"$dir/log4j2.properties"
    if [ ! -f "$dir/data/meta.properties" ]; then
      log "formatting KRaft storage $dir/data"
      # shellcheck disable=SC2046
      $(cluster_kafka_java "$n") -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format -t "$cluster_id" \
        -c "$dir/server.properties" >"$dir/format.log" 2>&1 \
        || { tail -n 20 "$dir/format.log" >&2; die "kafka storage format failed (broker $n)"; }
    fi
    if ! our_pid "$dir/kafka.pid" "$dir/server.properties" >/dev/null; then
      port_open "$port" && die "port $port is taken by another process"
      # shellcheck disable=SC2046
      spawn "$dir/kafka.pid" "$dir/kafka.log" "$dir" $(cluster_kafka_java "$n") -cp "$KAFKA_LIBS/*" \
        kafka.Kafka "$dir/server.properties"
    fi
  done
  for n in $KAFKA_NODES; do
    wait_for "kafka broker $n" 120 "$CLUSTER_DIR/kafka-$n/kafka.log" cluster_kafka_ready "$n"
  done
}

cluster_kafka_ready() { # node
  local dir=$CLUSTER_DIR/kafka-$1
  our_pid "$dir/kafka.pid" "$dir/server.properties" >/dev/null || probe_died "kafka broker $1" "$dir/kafka.log"
  port_open "$(cluster_kafka_port "$1")" && grep -q "Kafka Server started" "$dir/kafka.log"
}

# --- ClickHouse ------------------------------------------------------------------------------------

cluster_ch_up() {
  local pw n
  pw=$(secret "$LOCAL/secrets/clickhouse.password")
  local remote="" shard
  for shard in 1 2; do
    remote="$remote        <shard>\n            <internal_replication>true</internal_replication>\n"
    for n in $CH_NODES; do
      [ "$(cluster_ch_shard "$n")" = "$shard" ] || continue
      remote="$remote            <replica><host>127.0.0.1</host><port>$(cluster_ch_tcp_port "$n")</port><user>default</user><password>$pw</password></replica>\n"
    done
    remote="$remote        </shard>\n"
  done
  for n in $CH_NODES; do
    local dir=$CLUSTER_DIR/clickhouse-$n http tcp
    http=$(cluster_ch_http_port "$n"); tcp=$(cluster_ch_tcp_port "$n")
    mkdir -p "$dir"/{data,tmp,user_files,format_schemas,log}
    cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>$dir/log/clickhouse.log</log>
        <errorlog>$dir/log/clickhouse.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$http</http_port>
    <tcp_port>$tcp</tcp_port>
    <interserver_http_port>$(cluster_ch_interserver_port "$n")</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>$CH_DIR/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>134217728</mark_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
    <zookeeper>
        <node><host>127.0.0.1</host><port>$ZK_PORT</port></node>
        <session_timeout_ms>10000</session_timeout_ms>
    </zookeeper>
    <macros>
        <shard>$(cluster_ch_shard "$n")</shard>
        <replica>clickhouse-$n</replica>
    </macros>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
    <remote_servers>
    <$CLUSTER_NAME>
$(printf "%b" "$remote")    </$CLUSTER_NAME>
    </remote_servers>
</yandex>
EOF
    chmod 600 "$dir/config.xml" # it holds the cluster's password, as users.xml does
    if ! our_pid "$dir/clickhouse.pid" "$dir/config.xml" >/dev/null; then
      port_open "$http" && die "port $http is taken by another process"
      spawn "$dir/clickhouse.pid" "$dir/log/stdout.log" "$dir" clickhouse-server --config-file="$dir/config.xml"
    fi
  done
  for n in $CH_NODES; do
    wait_for "clickhouse node $n" 60 "$CLUSTER_DIR/clickhouse-$n/log/clickhouse.err.log" cluster_ch_ready "$n"
  done
}

cluster_ch_ready() { # node
  local dir=$CLUSTER_DIR/clickhouse-$1
  our_pid "$dir/clickhouse.pid" "$dir/config.xml" >/dev/null || probe_died "clickhouse node $1" "$dir/log/clickhouse.err.log"
  [ "$(curl -fsS "http://127.0.0.1:$(cluster_ch_http_port "$1")/ping" 2>/dev/null)" = "Ok." ]
}

# --- commands --------------------------------------------------------------------------------------

cluster_up() {
  cluster_install
  zk_up
  ch_users_xml
  cluster_ch_up
  cluster_kafka_up
}

cluster_down() {
  local n pid i pids=() names=()
  # All brokers are signalled at once: each one's controlled shutdown needs an active controller,
  # and stopped one by one the last broker is left without a quorum (2 of 3 voters gone) and
  # waits out its 30 s before it is killed.
  for n in $KAFKA_NODES; do
    if pid=$(our_pid "$CLUSTER_DIR/kafka-$n/kafka.pid" "$CLUSTER_DIR/kafka-$n/server.properties"); then
      kill -TERM "$pid" 2>/dev/null && { pids+=("$pid"); names+=("kafka-$n"); }
    fi
  done
  for i in "${!pids[@]}"; do stop_pid "${names[$i]}" "${pids[$i]}"; done
  for n in $KAFKA_NODES; do rm -f "$CLUSTER_DIR/kafka-$n/kafka.pid"; done
  for n in $CH_NODES; do cluster_stop "clickhouse-$n"; done
  if pid=$(our_pid "$ZK_DIR/zookeeper.pid" "$ZK_DIR/zoo.cfg"); then stop_pid zookeeper "$pid"; fi
  return 0
}

cluster_stop() { # kafka-N | clickhouse-N | zookeeper [KILL]
  local name=$1 dir=$CLUSTER_DIR/$1 pid marker pidfile signal=${2:-TERM}
  case $name in
    kafka-[1-3]) marker=$dir/server.properties; pidfile=$dir/kafka.pid ;;
    clickhouse-[1-4]) marker=$dir/config.xml; pidfile=$dir/clickhouse.pid ;;
    zookeeper) marker=$ZK_DIR/zoo.cfg; pidfile=$ZK_DIR/zookeeper.pid ;;
    *) die "stop takes postgres, kafka, clickhouse, zookeeper, kafka-1..3 or clickhouse-1..4" ;;
  esac
  if pid=$(our_pid "$pidfile" "$marker"); then
    if [ "$signal" = KILL ]; then
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
      log "$name killed"
    else
      stop_pid "$name" "$pid"
    fi
  fi
  rm -f "$pidfile"
}

cluster_status() {
  local n
  if our_pid "$ZK_DIR/zookeeper.pid" "$ZK_DIR/zoo.cfg" >/dev/null; then
    echo "zookeeper   up    127.0.0.1:$ZK_PORT  Apache ZooKeeper $ZK_VERSION"
  fi
  for n in $KAFKA_NODES; do
    if our_pid "$CLUSTER_DIR/kafka-$n/kafka.pid" "$CLUSTER_DIR/kafka-$n/server.properties" >/dev/null; then
      echo "kafka-$n     up    127.0.0.1:$(cluster_kafka_port "$n")  Apache Kafka $KAFKA_VERSION (KRaft, cluster)"
    fi
  done
  for n in $CH_NODES; do
    if our_pid "$CLUSTER_DIR/clickhouse-$n/clickhouse.pid" "$CLUSTER_DIR/clickhouse-$n/config.xml" >/dev/null; then
      echo "clickhouse-$n up    127.0.0.1:$(cluster_ch_http_port "$n")  shard $(cluster_ch_shard "$n")"
    fi
  done
}

cluster_write_env() {
  local n brokers="" nodes=""
  for n in $KAFKA_NODES; do brokers="$brokers${brokers:+,}127.0.0.1:$(cluster_kafka_port "$n")"; done
  for n in $CH_NODES; do nodes="$nodes${nodes:+,}http://127.0.0.1:$(cluster_ch_http_port "$n")"; done
  # The cluster's brokers and first ClickHouse node replace the single-node stack's.
  sed -i '/^CDC_RELAY_KAFKA_BROKERS=/d; /^CDC_RELAY_CLICKHOUSE_URL=/d' "$ENV_FILE"
  cat >>"$ENV_FILE" <<EOF
# The cluster stack (scripts/services up --cluster): 3 KRaft brokers, ClickHouse cluster
# $CLUSTER_NAME of 2 shards x 2 replicas (nodes 1, 2: shard 1; 3, 4: shard 2) over ZooKeeper.
CDC_RELAY_KAFKA_BROKERS=$brokers
CDC_RELAY_CLICKHOUSE_URL=http://127.0.0.1:$(cluster_ch_http_port 1)
CDC_RELAY_CLICKHOUSE_CLUSTER=$CLUSTER_NAME
# For tests and scripts/chaos --cluster: every ClickHouse node, in node order.
CDC_RELAY_TEST_CLICKHOUSE_NODES=$nodes
CDC_RELAY_TEST_ZOOKEEPER=127.0.0.1:$ZK_PORT
EOF
}
