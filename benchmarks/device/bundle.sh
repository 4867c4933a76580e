#!/usr/bin/env bash
# Build .gpu/ (git-ignored) for a one-shot run on a lent GPU machine that has
# python3 + torch but no network, no RabbitMQ, no Redis, no Erlang:
#
#   .gpu/wheels/          wheels (Python 3.12, x86-64) the project needs and that machine lacks
#   .gpu/fallback/        wheels installed there only when its own copy is older than our pin
#   .gpu/runtime.tar.xz   this machine's Erlang + RabbitMQ 3.10.8 + redis-server, relocatable,
#                         with the shared libraries they link (used there only where missing)
#
# Then: bash benchmarks/device/run.sh on that machine, with .gpu carried.
# Usage: bash benchmarks/device/bundle.sh   (from anywhere; needs pip + network to PyPI)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DEST=$ROOT/.gpu
PY=${PYTHON:-python3}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"

# Packages the device lacks (KINDS.md "Python packages already there"), pinned by constraints.txt.
REQUIRED=(celery kombu amqp billiard vine click-didyoumean click-plugins click-repl prompt_toolkit
  wcwidth redis pika tzlocal memory-profiler dramatiq cryptography cffi pycparser)
# The device has these, maybe older than celery/kombu require: run.sh installs each only then.
FALLBACK=(click python-dateutil msgpack prometheus_client packaging)

pin() { # NAME -> NAME==VERSION from constraints.txt (names compared PEP 503-normalised)
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  local line
  line=$(grep -v '^#' constraints.txt | while IFS= read -r l; do
    n=${l%%==*}
    [ "$(echo "$n" | tr 'A-Z_.' 'a-z--')" = "$want" ] && echo "$l"
  done)
  [ -n "$line" ] || { echo "bundle.sh: $1 is not pinned in constraints.txt" >&2; exit 1; }
  echo "$line"
}

download() { # DIR NAME...
  local dir=$1
  shift
  local specs=()
  for n in "$@"; do specs+=("$(pin "$n")"); done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$dir" "${specs[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

rm -rf "$DEST/wheels" "$DEST/fallback"
mkdir -p "$DEST/wheels" "$DEST/fallback"
echo "== wheels"
download "$DEST/wheels" "${REQUIRED[@]}"
download "$DEST/fallback" "${FALLBACK[@]}"
ls "$DEST/wheels" "$DEST/fallback"

# Every Requires-Dist (for CPython 3.12 on Linux, no extras) must be in one of the two sets or
# already on the device.
"$PY" - "$DEST" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
dest = Path(sys.argv[1])
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
device = {norm(n) for n in """numpy safetensors msgpack prometheus-client psutil rich click
    python-dateutil matplotlib pytest pytest-timeout pyyaml six typing-extensions packaging
    torch""".split()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
wheels = sorted(dest.glob("*/*.whl"))
have = {norm(w.name.split("-")[0]) for w in wheels} | device
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker is None or req.marker.evaluate(env):
                    if norm(req.name) not in have:
                        missing.append(f"{w.name}: {req}")
if missing:
    sys.exit("bundle.sh: requirements not bundled:\n  " + "\n  ".join(missing))
print(f"requirements closed over {len(wheels)} wheels")
EOF

echo "== runtime"
STAGE=$(mktemp -d /tmp/gpu-bundle.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
RT=$STAGE/rt
RMQ=$(ls -d /usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8)
mkdir -p "$RT/lib" "$RT/redis"
cp -a /usr/lib/erlang "$RT/erlang"
cp -a "$RMQ" "$RT/rabbitmq"
cp -a /usr/bin/redis-server "$RT/redis/redis-server"
# Shared libraries beyond glibc that the broker, Erlang's NIFs/ports and Redis link.
mapfile -t bins < <(
  find "$RT/erlang" "$RT/rabbitmq" -type f \( -name '*.so' -o -perm -u+x \) -print
  echo "$RT/redis/redis-server"
)
for b in "${bins[@]}"; do
  file -b "$b" 2>/dev/null | grep -q ELF || continue
  ldd "$b" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r soname path; do
  case $soname in
  libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | libresolv.so* | ld-linux*) ;;
  *) cp -L "$path" "$RT/lib/$soname" ;;
  esac
done
{
  echo "built $(date -u +%FT%TZ) on $(. /etc/os-release && echo "$PRETTY_NAME"), $(uname -m)"
  echo "erlang: $(cat /usr/lib/erlang/releases/*/OTP_VERSION 2>/dev/null | head -1)"
  echo "rabbitmq: $(basename "$RMQ")"
  echo "redis: $(/usr/bin/redis-server --version)"
  echo "libs: $(ls "$RT/lib" | tr '\n' ' ')"
} >"$RT/MANIFEST"
cat "$RT/MANIFEST"
rm -f "$DEST/runtime.tar.xz"
tar -C "$STAGE" -cf - rt | xz -T0 -9 >"$DEST/runtime.tar.xz"

echo "== sizes"
du -sh "$DEST/wheels" "$DEST/fallback" "$DEST/runtime.tar.xz" "$DEST"
size=$(du -sm "$DEST" | cut -f1)
[ "$size" -lt 40 ] || { echo "bundle.sh: .gpu is ${size} MiB, over 40" >&2; exit 1; }
