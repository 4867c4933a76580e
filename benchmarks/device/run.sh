#!/usr/bin/env bash
# One-shot run on a lent GPU machine (python3 + torch, no network, no broker): install the
# bundled wheels, start the bundled Redis + RabbitMQ, print the GPU facts, build the weights,
# run the unit tests and the GPU-marked tests, then the benchmark on the GPU.
#
#   bash benchmarks/device/bundle.sh      # here, once: builds .gpu/ (git-ignored)
#   bash benchmarks/device/run.sh         # there, with .gpu carried; results in $OUT
#   bash benchmarks/device/run.sh services   # only start, check and stop the bundled services
#   bash benchmarks/device/run.sh scaling    # only the scaling lane (benchmarks/device/scaling.sh)
#
# Every step has its own timeout (they add up to about 411 s); a failed step does not stop the
# ones after it, and the script exits 1 at the end if any failed.  Output goes to the
# terminal and to $OUT/device.log; $OUT (default var/device-out) gets at most 7 files.
#
# Knobs, for trying it elsewhere (defaults are the device's):
#   OUT                        results folder                           var/device-out
#   DEVICE_PYTHON              interpreter                              python3
#   DEVICE_SITE                where the wheels go (on PYTHONPATH)      /tmp/site
#   DEVICE_WHEELS_DIR          the wheels to install                    .gpu/wheels
#   DEVICE_RUN_SKIP_SERVICES   1: use the RabbitMQ + Redis already running
#   DEVICE_RT_DIR              where the runtime is unpacked            /tmp/gpu-rt
#   DEVICE_FORCE_BUNDLED_LIBS  1: use every bundled library, not only the missing ones
#   DEVICE_AMQP_PORT DEVICE_REDIS_PORT DEVICE_DIST_PORT DEVICE_EPMD_PORT DEVICE_NODE
#                              5672 / 6379 / 25672 / 4369 / rabbit@localhost
#   DEVICE_WEIGHTS_DIR         weights folder                           var/weights
#   BENCH_DEVICE               device of the inference lanes            cuda:0
#   BENCH_ARGS                 size of the benchmark                    --quick --requests 200 --window-requests 400 --producers 4
#   BENCH_LANES                lanes                                    (the batching-relevant ones)
#   PYTEST_EXTRA               extra pytest arguments, e.g. -W 'ignore::DeprecationWarning:foo'
#   DEVICE_BENCH_LIMIT         seconds the benchmark may take           140
#   SCALING_ARGS               the scaling lane's options (mode scaling) --workers 1,2,4,8 --rounds 3 --seconds 8
#   DEVICE_SCALING_LIMIT       seconds the scaling lane may take        330
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
export OUT=${OUT:-$ROOT/var/device-out}
mkdir -p "$OUT"

export PY=${DEVICE_PYTHON:-python3}
export SITE=${DEVICE_SITE:-/tmp/site}
export WHEELS=${DEVICE_WHEELS_DIR:-.gpu/wheels}
export RT=${DEVICE_RT_DIR:-/tmp/gpu-rt}
export AMQP_PORT=${DEVICE_AMQP_PORT:-5672} REDIS_PORT=${DEVICE_REDIS_PORT:-6379}
export DR_DIST_PORT=${DEVICE_DIST_PORT:-25672} DR_EPMD_PORT=${DEVICE_EPMD_PORT:-4369}
export DR_NODE=${DEVICE_NODE:-rabbit@localhost}
export SKIP_SERVICES=${DEVICE_RUN_SKIP_SERVICES:-0} FORCE_LIBS=${DEVICE_FORCE_BUNDLED_LIBS:-0}
export WEIGHTS=${DEVICE_WEIGHTS_DIR:-$ROOT/var/weights}
export BENCH_DEVICE=${BENCH_DEVICE:-cuda:0}
export BENCH_ARGS=${BENCH_ARGS:---quick --requests 200 --window-requests 400 --producers 4}
export BENCH_LANES=${BENCH_LANES:-amqp_floor,celery_baseline,deployment_noop,deployment_infer,deployment_infer_batched,deployment_infer_chunked,dramatiq,in_process}
export PYTEST_EXTRA=${PYTEST_EXTRA:-}
export BENCH_LIMIT=${DEVICE_BENCH_LIMIT:-140}
export SCALING_ARGS=${SCALING_ARGS:---workers 1,2,4,8 --rounds 3 --seconds 8}
export SCALING_LIMIT=${DEVICE_SCALING_LIMIT:-330}
export WAIT_S=25  # check_services gives up after this
export DR_LOGS=$RT/logs
export WORK=${TMPDIR:-/tmp}/gpu-run.$$
mkdir -p "$WORK/tmp"

export PYTHONPATH=$SITE:$ROOT PYTHONUNBUFFERED=1 MPLBACKEND=Agg TMPDIR=$WORK/tmp
# pytest with the plugins the project installs (pytest-timeout), not every one the machine has.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTEST_ADDOPTS="-p pytest_timeout ${PYTEST_ADDOPTS:-}"
export CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT//
export CELERY_RESULT_BACKEND=redis://127.0.0.1:$REDIS_PORT/0
export INFER_WEIGHTS_DIR=$WEIGHTS

# ---------------------------------------------------------------- steps (run under timeout)

install_wheels() {
  set -e
  rm -rf "$SITE"
  # Fallback wheels only where the machine's own copy is missing or older than ours.
  local older
  older=$(PYTHONPATH= "$PY" - .gpu/fallback <<'PYEOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
try:
    from packaging.version import Version
except ImportError:  # numbers alone are enough to tell older from newer here
    def Version(v):
        return tuple(int(n) for n in re.findall(r"\d+", v.split("+")[0]))
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, ours = wheel.name.split("-")[:2]
    try:
        theirs = version(name)
    except PackageNotFoundError:
        theirs = None
    take = theirs is None or Version(theirs) < Version(ours)
    print(f"  {name}: device {theirs}, bundled {ours}: {'bundled' if take else 'device'}", file=sys.stderr)
    if take:
        print(wheel)
PYEOF
)
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl $older
  ls "$SITE" | grep -c dist-info | sed 's/^/dist-infos in site: /'
}

unpack_runtime() {
  set -e
  rm -rf "$RT"
  mkdir -p "$RT"
  if command -v xz >/dev/null; then
    tar -C "$RT" --strip-components=1 -xJf .gpu/runtime.tar.xz
  else
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' \
      .gpu/runtime.tar.xz "$RT.x"
    mv "$RT.x"/rt/* "$RT"/ && rm -rf "$RT.x"
  fi
  cat "$RT/MANIFEST"
  # Debian's erl scripts hardcode ROOTDIR=/usr/lib/erlang: point them at the unpacked copy.
  sed -i "s|/usr/lib/erlang|$RT/erlang|g" "$RT"/erlang/bin/erl "$RT"/erlang/bin/start \
    "$RT"/erlang/erts-*/bin/erl "$RT"/erlang/erts-*/bin/start
  # Bundled shared libraries go on the services' LD_LIBRARY_PATH only where the system lacks them.
  mkdir -p "$RT/libx"
  local bins=("$RT"/erlang/erts-*/bin/* "$RT"/erlang/lib/crypto-*/priv/lib/*.so "$RT/redis/redis-server")
  if [ "$FORCE_LIBS" = 1 ]; then
    ln -sf "$RT"/lib/* "$RT/libx/"
  else
    for _ in 1 2 3; do # a library it adds may need another
      for so in $(for b in "${bins[@]}"; do LD_LIBRARY_PATH=$RT/libx ldd "$b" 2>/dev/null; done |
        awk '/not found/ {print $1}' | sort -u); do
        if [ -e "$RT/lib/$so" ]; then ln -sf "$RT/lib/$so" "$RT/libx/$so"; else echo "no bundled $so"; fi
      done
    done
  fi
  echo "bundled libraries in use: $(ls "$RT/libx" | tr '\n' ' ')"
  local missing
  missing=$(for b in "${bins[@]}"; do LD_LIBRARY_PATH=$RT/libx ldd "$b" 2>/dev/null; done | grep "not found" | sort -u)
  [ -z "$missing" ] || { echo "still missing: $missing"; return 1; }
}

rabbit_env() { # the environment of the broker and of rabbitmqctl
  export HOME=$RT/home PATH=$RT/erlang/bin:$PATH LD_LIBRARY_PATH=$RT/libx
  export RABBITMQ_NODENAME=$DR_NODE RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$AMQP_PORT
  export RABBITMQ_DIST_PORT=$DR_DIST_PORT ERL_EPMD_PORT=$DR_EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_CONF_ENV_FILE=$RT/etc/rabbitmq-env.conf
  export RABBITMQ_CONFIG_FILE=$RT/etc/rabbitmq.conf RABBITMQ_CONFIG_FILES=$RT/etc/conf.d
  export RABBITMQ_ADVANCED_CONFIG_FILE=$RT/etc/advanced.config
  export RABBITMQ_ENABLED_PLUGINS_FILE=$RT/etc/enabled_plugins
  export RABBITMQ_MNESIA_BASE=$RT/mnesia RABBITMQ_LOG_BASE=$DR_LOGS/rabbitmq
  export RABBITMQ_PID_FILE=$RT/rabbitmq.pid
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_DIST_PORT_MIN=$((DR_DIST_PORT + 10000)) RABBITMQ_CTL_DIST_PORT_MAX=$((DR_DIST_PORT + 10010))
}

start_services() {
  set -e
  mkdir -p "$RT/home" "$RT/etc/conf.d" "$RT/mnesia" "$RT/redis-data" "$DR_LOGS/rabbitmq"
  LD_LIBRARY_PATH=$RT/libx "$RT/redis/redis-server" --bind 127.0.0.1 --port "$REDIS_PORT" \
    --save '' --appendonly no --dir "$RT/redis-data" --logfile "$DR_LOGS/redis.log" \
    --daemonize no </dev/null >/dev/null 2>&1 &
  echo $! >"$RT/redis-server.pid"
  : >"$RT/etc/rabbitmq-env.conf"
  echo '[].' >"$RT/etc/enabled_plugins"
  printf '%s\n' "listeners.tcp.1 = 127.0.0.1:$AMQP_PORT" "log.file.level = info" \
    "log.console = false" >"$RT/etc/rabbitmq.conf"
  # The node is rabbit@localhost: the name must resolve (a bare VM may lack the line).
  getent hosts localhost >/dev/null || echo '127.0.0.1 localhost' >>/etc/hosts
  (
    rabbit_env
    # The rabbitmq_server-3.10.8/sbin script itself: no Debian su wrapper, runs as root.
    exec "$RT/rabbitmq/sbin/rabbitmq-server" </dev/null >"$DR_LOGS/rabbitmq-server.out" 2>&1
  ) &
  echo $! >"$RT/rabbitmq-server.pid"
  echo "redis-server pid $(cat "$RT/redis-server.pid"), rabbitmq-server pid $(cat "$RT/rabbitmq-server.pid")"
}

check_services() { # both answer a real client, or say why not
  "$PY" - <<'PYEOF'
import os, time
import amqp, redis
deadline = time.monotonic() + float(os.environ.get("WAIT_S", "50"))
port, rport = os.environ["AMQP_PORT"], int(os.environ["REDIS_PORT"])
ok = {"amqp": None, "redis": None}
start = time.monotonic()
while time.monotonic() < deadline and not all(ok.values()):
    if not ok["redis"]:
        try:
            ok["redis"] = redis.Redis(host="127.0.0.1", port=rport, socket_timeout=2).ping() and time.monotonic() - start
        except Exception as e:
            last_redis = repr(e)
    if not ok["amqp"]:
        try:
            c = amqp.Connection(host=f"127.0.0.1:{port}", userid="guest", password="guest", connect_timeout=2)
            c.connect()
            props = c.server_properties
            c.close()
            ok["amqp"] = time.monotonic() - start
            print(f"amqp: {props.get('product')} {props.get('version')} on {port}")
        except Exception as e:
            last_amqp = repr(e)
    time.sleep(0.5)
for k, v in ok.items():
    print(f"{k}: " + (f"up after {v:.1f}s" if v else f"DOWN ({last_amqp if k == 'amqp' else last_redis})"))
raise SystemExit(0 if all(ok.values()) else 1)
PYEOF
}

stop_services() { # TERM to the rabbitmq-server script stops the broker cleanly; then the rest
  local f pid i alive
  for f in "$RT/rabbitmq-server.pid" "$RT/redis-server.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
  done
  for i in $(seq 20); do # up to 10 s for a clean stop
    alive=0
    for f in "$RT/rabbitmq-server.pid" "$RT/rabbitmq.pid" "$RT/redis-server.pid"; do
      [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1
    done
    [ $alive = 1 ] || break
    sleep 0.5
  done
  for f in "$RT/rabbitmq-server.pid" "$RT/rabbitmq.pid" "$RT/redis-server.pid"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill -0 "$pid" 2>/dev/null && { echo "kill -9 $pid ($f)"; kill -9 "$pid"; }
    rm -f "$f"
  done
  (rabbit_env && timeout 5 epmd -port "$DR_EPMD_PORT" -kill >/dev/null 2>&1)
  echo "services stopped"
}

rabbitmqctl_status() { # the CLI works from the unpacked layout too
  rabbit_env
  "$RT/rabbitmq/sbin/rabbitmqctl" -n "$DR_NODE" status | grep -iE "version|pid|listeners|interface" | head
}

facts() {
  nvidia-smi || echo "no nvidia-smi"
  "$PY" - <<'PYEOF'
import platform, sys
from importlib.metadata import version
import torch
print(f"python {platform.python_version()} at {sys.executable}")
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()})")
for name in ("numpy", "celery", "kombu", "redis", "dramatiq"):
    try:
        print(f"  {name} {version(name)}")
    except Exception as e:
        print(f"  {name}: {e!r}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
          f"{p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
if torch.cuda.is_available():
    x = torch.randn(1024, 1024, device="cuda")
    print(f"  matmul on cuda:0 ok: {float((x @ x).sum()):.3g}")
PYEOF
  "$PY" -m pip list 2>/dev/null | grep -iE '^(click|python-dateutil|msgpack|prometheus.client|packaging|rich|psutil|pytest|pytest-timeout|pyyaml|safetensors|matplotlib|numpy|torch) '
}

unit_tests() {
  # shellcheck disable=SC2086
  "$PY" -m pytest -p no:cacheprovider tests/unit -q --junitxml="$OUT/junit-unit.xml" $PYTEST_EXTRA
}

unit_rerun() { # after a failure: the same with warnings shown, not raised (pyproject says error)
  set -o pipefail
  # shellcheck disable=SC2086
  "$PY" -m pytest -p no:cacheprovider tests/unit -q -W default $PYTEST_EXTRA | tail -n 60
}

gpu_tests() {
  # shellcheck disable=SC2086
  "$PY" -m pytest -p no:cacheprovider tests -m gpu -rA --junitxml="$OUT/junit-gpu.xml" $PYTEST_EXTRA || return
  # On a CUDA machine a skipped GPU test is a failure: it did not run where it should.
  "$PY" - "$OUT/junit-gpu.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
import torch
s = ET.parse(sys.argv[1]).getroot()
s = s if s.tag == "testsuite" else s.find("testsuite")
tests, skipped = int(s.get("tests")), int(s.get("skipped"))
print(f"gpu tests: {tests}, skipped {skipped}")
if torch.cuda.is_available() and (skipped or not tests):
    raise SystemExit("GPU tests skipped on a machine with CUDA")
PYEOF
}

bench() {
  export DEVICE_RUN_BENCH=$WORK # marks the workers it starts (kill_leftovers)
  # shellcheck disable=SC2086
  "$PY" -m benchmarks $BENCH_ARGS --device "$BENCH_DEVICE" --lanes "$BENCH_LANES" \
    --json "$OUT/gpu-bench.json"
}

scaling() { # the scaling lane on this machine's CPU cores: CPU workers behind the router
  export DEVICE_RUN_BENCH=$WORK # marks the workers and clients it starts (kill_leftovers)
  # shellcheck disable=SC2086
  "$PY" -m benchmarks scaling $SCALING_ARGS --device cpu --json "$OUT/scaling.json"
}

export -f install_wheels unpack_runtime rabbit_env start_services check_services stop_services \
  rabbitmqctl_status \
  facts unit_tests unit_rerun gpu_tests bench scaling

# ---------------------------------------------------------------- driver

SUMMARY=()
FAILED=()
step() { # NAME TIMEOUT_S FUNCTION
  local name=$1 limit=$2 fn=$3 start=$SECONDS rc
  echo
  echo "===== $name (limit ${limit}s) $(date -u +%T)"
  timeout -k 5 "$limit" bash -c "$fn"
  rc=$?
  [ $rc -eq 124 ] && echo "!!!!! $name timed out after ${limit}s"
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss / %ss' "$name" "$rc" $((SECONDS - start)) "$limit")")
  [ $rc -eq 0 ] || FAILED+=("$name")
  return $rc
}

kill_leftovers() { # bench workers run in sessions of their own: a timed-out bench leaves them
  local p n=0 pass found
  for pass in 1 2 3 4 5; do
    found=0
    for p in /proc/[0-9]*; do
      if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF "DEVICE_RUN_BENCH=$WORK"; then
        kill -9 "${p#/proc/}" 2>/dev/null && { n=$((n + 1)); found=1; }
      fi
    done
    [ $found = 1 ] || break
    sleep 1
  done
  [ $n -eq 0 ] || echo "killed $n processes the benchmark left behind"
}

collect_logs() {
  { [ "$SKIP_SERVICES" = 1 ] || find "$DR_LOGS" -type f; find "$WORK/tmp" -name '*.log'; } 2>/dev/null |
    tar -czf "$OUT/logs.tar.gz" --ignore-failed-read -T - 2>/dev/null
  rm -rf "$WORK"
}

finish() {
  [ "$SKIP_SERVICES" = 1 ] || stop_services
  collect_logs
  echo
  echo "===== summary ($((SECONDS))s in all)"
  printf '%s\n' "${SUMMARY[@]}"
  ls -la "$OUT"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    return 1
  fi
  echo "all steps passed"
}

services_up() {
  if [ "$SKIP_SERVICES" = 1 ]; then
    echo "(DEVICE_RUN_SKIP_SERVICES=1: using the running RabbitMQ and Redis)"
    step services 30 check_services
    return
  fi
  step unpack 20 unpack_runtime && step start 10 start_services && step services 30 check_services
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "----- services failed: logs"
    for f in "$DR_LOGS/rabbitmq-server.out" "$DR_LOGS/redis.log" "$DR_LOGS"/rabbitmq/*.log; do
      [ -f "$f" ] && { echo "--- $f"; tail -n 40 "$f"; }
    done
  fi
  return $rc
}

main() {
  echo "device run at $(date -u +%FT%TZ) on $(uname -n), $(nproc) cores; OUT=$OUT"
  git -C "$ROOT" log --oneline -1 2>/dev/null
  git -C "$ROOT" status --short 2>/dev/null | head -20
  step wheels 30 install_wheels
  if [ "${1:-}" = services ]; then # only the services: start, check, stop
    services_up && step ctl 30 rabbitmqctl_status
    finish
    return
  fi
  if [ "${1:-}" = scaling ]; then # only the scaling lane: 30 + 60 + 20 + 20 + 330 = 460 s at most
    services_up
    step facts 20 facts
    step weights 20 "\"\$PY\" -m models build --force --dir \"\$WEIGHTS\""
    step scaling "$SCALING_LIMIT" scaling || kill_leftovers
    finish
    return
  fi
  # Budget: 30 + 20 + 10 + 30 + 20 + 20 + 60 (+ 40) + 30 + 140 = 400 s at most, the stop ~11 s.
  services_up
  step facts 20 facts
  step weights 20 "\"\$PY\" -m models build --force --dir \"\$WEIGHTS\""
  step unit 60 unit_tests || step unit-rerun 40 unit_rerun
  step gpu 30 gpu_tests
  step bench "$BENCH_LIMIT" bench || kill_leftovers
  finish
}

main "$@" 2>&1 | tee "$OUT/device.log"
exit "${PIPESTATUS[0]}"
