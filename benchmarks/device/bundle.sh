#!/usr/bin/env bash
# Build .gpu/ (git-ignored) for a one-shot run on a lent GPU machine that has python3 + torch
# but no network, no RabbitMQ, no Redis and no Erlang:
#
#   .gpu/wheels/          wheels (CPython 3.12, x86-64) the project needs and that machine lacks
#   .gpu/fallback/        wheels run.sh installs there only where its own copy is older than ours
#   .gpu/runtime.tar.xz   this machine's Erlang + RabbitMQ 3.10.8 (only what the broker boots,
#                         debug info stripped) + redis-server, relocatable, with the shared
#                         libraries they link (run.sh uses those only where the system lacks one)
#
# Then, on that machine, with .gpu carried: bash benchmarks/device/run.sh
# Usage: bash benchmarks/device/bundle.sh   (needs pip with PyPI, RabbitMQ 3.10.8, Erlang, Redis)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DEST=$ROOT/.gpu
PY=${PYTHON:-python3}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"

# What the device lacks (device README, KINDS.md "Python packages already there"), pinned by
# constraints.txt.  cryptography (+ cffi, pycparser): tests/unit/test_signing.py.
REQUIRED=(celery kombu amqp billiard vine click-didyoumean click-plugins click-repl prompt_toolkit
  wcwidth redis pika tzlocal memory-profiler dramatiq cryptography cffi pycparser)
# The device has these, maybe older than celery 5.7 / kombu 5.7 pin: run.sh installs each of
# them only where the device's own version is older.
FALLBACK=(click python-dateutil msgpack prometheus_client packaging)

norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
pin() { # NAME -> NAME==VERSION from constraints.txt
  local want line
  want=$(norm "$1")
  while IFS= read -r line; do
    case $line in '#'* | '') continue ;; esac
    if [ "$(norm "${line%%==*}")" = "$want" ]; then
      echo "$line"
      return
    fi
  done <constraints.txt
  echo "bundle.sh: $1 is not pinned in constraints.txt" >&2
  return 1
}

download() { # DIR NAME...
  local dir=$1 n specs=()
  shift
  for n in "$@"; do specs+=("$(pin "$n")"); done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$dir" "${specs[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

echo "== wheels"
rm -rf "$DEST/wheels" "$DEST/fallback"
mkdir -p "$DEST/wheels" "$DEST/fallback"
download "$DEST/wheels" "${REQUIRED[@]}"
download "$DEST/fallback" "${FALLBACK[@]}"
[ "$(ls "$DEST/wheels" | wc -l)" -eq "${#REQUIRED[@]}" ] || { echo "bundle.sh: a wheel is missing" >&2; exit 1; }
[ "$(ls "$DEST/fallback" | wc -l)" -eq "${#FALLBACK[@]}" ] || { echo "bundle.sh: a fallback wheel is missing" >&2; exit 1; }
ls "$DEST/wheels" "$DEST/fallback"

# Every Requires-Dist (CPython 3.12 on Linux, no extras) must be bundled or already there.
"$PY" - "$DEST" <<'PYEOF'
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
                if (req.marker is None or req.marker.evaluate(env)) and norm(req.name) not in have:
                    missing.append(f"{w.name}: {req}")
if missing:
    sys.exit("bundle.sh: requirements not bundled:\n  " + "\n  ".join(missing))
print(f"requirements closed over {len(wheels)} wheels")
PYEOF

echo "== runtime"
STAGE=$(mktemp -d /tmp/gpu-bundle.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
RT=$STAGE/rt
RMQ=/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8
mkdir -p "$RT/lib" "$RT/redis" "$RT/erlang/lib" "$RT/rabbitmq/plugins"
(cd /usr/lib/erlang && cp -a bin releases erts-* "$RT/erlang/")
(cd "$RMQ" && cp -a sbin escript INSTALL LICENSE "$RT/rabbitmq/")
# Only the applications the broker boots: the closure of the .app files' application lists
# from rabbit, rabbitmq_prelaunch and rabbit_common, plus the OTP ones RabbitMQ starts by hand.
"$PY" - /usr/lib/erlang/lib "$RMQ/plugins" >"$STAGE/apps" <<'PYEOF'
import re, sys
from pathlib import Path
apps = {re.sub(r"-[0-9][^-]*$", "", p.name): p for d in sys.argv[1:] for p in Path(d).iterdir() if p.is_dir()}
def deps(name):
    f = apps[name] / "ebin" / f"{name}.app"
    text = f.read_text(errors="replace") if f.exists() else ""
    found = re.findall(r"\{(?:included_|optional_)?applications,\s*\[([^\]]*)\]", text)
    return [a.strip() for group in found for a in group.split(",") if a.strip()]
todo = ["rabbit", "rabbitmq_prelaunch", "rabbit_common", "mnesia", "runtime_tools", "erts",
        "kernel", "stdlib", "sasl", "os_mon", "asn1"]
seen = set()
while todo:
    a = todo.pop()
    if a not in seen and a in apps:
        seen.add(a)
        todo += deps(a)
for a in sorted(seen):
    print(a, apps[a])
PYEOF
while read -r app dir; do
  case $dir in
  /usr/lib/erlang/*) cp -a "$dir" "$RT/erlang/lib/" ;;
  *) cp -a "$dir" "$RT/rabbitmq/plugins/" ;;
  esac
done <"$STAGE/apps"
echo "applications: $(cut -d' ' -f1 "$STAGE/apps" | tr '\n' ' ')"
find "$RT" -depth -type d \( -name src -o -name include -o -name doc -o -name examples \
  -o -name emacs \) -exec rm -rf {} +
# Debug info is most of each .beam: strip it, keeping the module attributes RabbitMQ reads at
# boot (rabbit_boot_step, feature flags) and the compile info.
erl -noshell -eval '
  Fs = filelib:wildcard("'"$RT"'/**/*.beam"),
  {ok, _} = beam_lib:strip_files(Fs, ["Attr", "CInf"]),
  io:format("stripped ~b .beam files~n", [length(Fs)]),
  halt().'
cp -L /usr/bin/redis-server "$RT/redis/redis-server"

# Shared libraries beyond glibc that the broker, Erlang's NIFs and ports, and Redis link.
find "$RT" -type f \( -name '*.so' -o -perm -u+x \) -print | while read -r b; do
  file -b "$b" | grep -q ELF || continue
  ldd "$b" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r soname path; do
  case $soname in
  libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | libresolv.so* | ld-linux*) ;;
  *) cp -L "$path" "$RT/lib/$soname" ;;
  esac
done
{
  echo "built $(date -u +%FT%TZ) on $(. /etc/os-release && echo "$PRETTY_NAME"), $(uname -m)"
  echo "erlang/otp: $(cat /usr/lib/erlang/releases/*/OTP_VERSION | head -1)"
  echo "rabbitmq: $(basename "$RMQ")"
  echo "redis: $(/usr/bin/redis-server --version)"
  echo "libs: $(ls "$RT/lib" | tr '\n' ' ')"
} >"$RT/MANIFEST"
cat "$RT/MANIFEST"
rm -f "$DEST/runtime.tar.xz"
tar -C "$STAGE" -cf - rt | xz -T0 -9 >"$DEST/runtime.tar.xz"

echo "== sizes"
du -sh "$DEST/wheels" "$DEST/fallback" "$DEST/runtime.tar.xz"
size=$(du -sk "$DEST" | cut -f1)
echo "total: $((size / 1024)) MiB in $DEST"
[ "$size" -lt $((40 * 1024)) ] || { echo "bundle.sh: .gpu is over 40 MiB" >&2; exit 1; }
