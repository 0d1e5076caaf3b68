#!/usr/bin/env bash
# The torch-free runtime on an emulated arm64 board (qemu user mode + a Debian arm64 root).
#
# Builds edgeattn's wheel here and installs it without the convert extra into a venv inside the
# arm64 root (onnxruntime, numpy, tokenizers and click come from PyPI for aarch64, as on a
# Raspberry Pi); converts tiny models here (x86_64, with the project's .venv); inside the root
# runs `edgeattn validate --golden` on each folder, `edgeattn generate` on one and
# `edgeattn profile --target pi5` on one; then runs the same folders on this machine's
# onnxruntime and compares the two runtimes' logits (scripts/arm64_compare.py).
#
# The emulated CPU is a Raspberry Pi 5's Cortex-A76 (QEMU_CPU): the instruction set a Pi 5 has
# (dot product, fp16; no i8mm, SVE or bf16), so onnxruntime picks the kernels it picks there.
# Folders with int4 weights also run with KleidiAI's kernels switched off and on a Pi 4's
# Cortex-A72 (no dot product), which take other arithmetic (docs/board.md says which).
#
# Needs root (debootstrap, chroot, mount). Installs qemu-user-static, debootstrap and
# binfmt-support with apt-get when they are missing. Exit 0 with one "SKIPPED" line where arm64
# binaries cannot run here (no root, no binfmt_misc, no qemu) or the board cannot be built (no
# Debian mirror or PyPI reachable); 1 when a check ran and failed; 2 on a setup error.
#
# Environment:
#   ARM64_CACHE       where the arm64 root is kept between runs      [/var/cache/edgeattn]
#   ARM64_MIRROR      Debian mirror for debootstrap   [the bookworm mirror of this machine's apt sources]
#   ARM64_WORK        a new folder for this run's folders, reports and logs   [under /tmp]
#   ARM64_REAL_MODEL  1: also SmolLM2 with the demo's spec (ring + int8 KV + int4 weights); long
#   ARM64_REBUILD     1: build the root again even if a cached one exists
set -euo pipefail

ROOT_VERSION=1  # bump when the root's contents change: a new cache key
RELEASE=bookworm
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV_PY=$REPO/.venv/bin/python
CACHE=${ARM64_CACHE:-/var/cache/edgeattn}
ROOT=$CACHE/arm64-root-$RELEASE-v$ROOT_VERSION
CHECK_DIR=/srv/edgeattn-check  # inside the root
BOARD_VENV=/opt/board          # inside the root
BOARD_CPU=cortex-a76           # Raspberry Pi 5 (BCM2712)
OTHER_CPU=cortex-a72           # Raspberry Pi 4 (BCM2711): no dot-product instructions
THREADS=2                      # onnxruntime threads (each one a qemu thread)
HOST=$(uname -m)
STARTED=$SECONDS
declare -A TOOK
FAILED=()

say() { printf 'arm64 check: %s\n' "$*"; }
skip() { say "SKIPPED: $*"; exit 0; }
die() { say "ERROR: $*" >&2; exit 2; }
phase() { PHASE=$1; PHASE_STARTED=$SECONDS; say "--- $1"; }
phase_done() { TOOK[$PHASE]=$((SECONDS - PHASE_STARTED)); }

# -- the host: qemu-user-static registered through binfmt_misc ----------------------------------

host_setup() {
  [ "$HOST" = x86_64 ] || skip "the host is $HOST; this check emulates aarch64 on x86_64"
  [ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot and mount); CI runs it as root"
  if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
      || ! command -v update-binfmts >/dev/null; then
    command -v apt-get >/dev/null || skip "qemu-user-static/debootstrap are missing and there is no apt-get"
    say "installing qemu-user-static debootstrap binfmt-support"
    apt-get update -qq || skip "apt-get update failed, so qemu-user-static cannot be installed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap binfmt-support >/dev/null \
      || skip "apt-get could not install qemu-user-static debootstrap binfmt-support"
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
      || skip "binfmt_misc cannot be mounted at /proc/sys/fs/binfmt_misc (an unprivileged container?)"
  fi
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true  # "already enabled" is not an error here
  local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
  [ "$(head -n 1 "$entry" 2>/dev/null)" = enabled ] || skip "qemu-aarch64 is not registered in binfmt_misc"
  # F (fix-binary): the kernel opened the interpreter at registration, so it runs inside a chroot.
  grep -q '^flags:.*F' "$entry" || skip "qemu-aarch64 is registered without the F flag, so a chroot cannot run it"
}

# The Debian mirror this machine's apt uses for $RELEASE (deb822 .sources or one-line .list files).
host_mirror() {
  local file
  {
    for file in /etc/apt/sources.list.d/*.sources; do
      [ -f "$file" ] && awk -v release="$RELEASE" 'BEGIN { RS = "" }
        !/\nEnabled: *no/ && $0 ~ ("Suites:[^\n]*[ \t]" release "([ \t\n]|$)") && /Types:[^\n]*deb([ \t\n]|$)/ {
          if (match($0, /URIs: *[^ \t\n]+/)) { uri = substr($0, RSTART, RLENGTH); sub(/URIs: */, "", uri); print uri } }' "$file"
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$file" ] && awk -v release="$RELEASE" '$1 == "deb" {
        i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        if ($(i + 1) == release) print $i }' "$file"
    done
  } | head -n 1
}

# -- the arm64 root ----------------------------------------------------------------------------

unmount_under() {  # every mount at or below $1, deepest first
  local path
  awk -v p="$1" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/mounts | sort -r | while read -r path; do
    umount "$path" 2>/dev/null || umount -l "$path"
  done
}

remove_tree() {  # unmounts first, and never crosses into another file system (the host's /dev, /sys)
  unmount_under "$1"
  rm -rf --one-file-system "$1"
}

cleanup() {
  local status=$?
  unmount_under "$ROOT"
  unmount_under "$ROOT.partial"
  exit "$status"
}

build_root() {
  phase "arm64 root"
  if [ -f "$ROOT/.edgeattn-root" ] && [ "${ARM64_REBUILD:-0}" != 1 ]; then
    say "reusing $ROOT ($(cat "$ROOT/.edgeattn-root"))"
    ROOT_STATE=cached
  else
    local mirror=${ARM64_MIRROR:-$(host_mirror)}
    [ -n "$mirror" ] || die "no Debian $RELEASE mirror in /etc/apt/sources.list*; set ARM64_MIRROR"
    remove_tree "$ROOT.partial"
    say "debootstrap --arch=arm64 --variant=minbase $RELEASE (packages are configured under emulation: minutes)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      "$RELEASE" "$ROOT.partial" "$mirror" >"$WORK/logs/debootstrap.log" 2>&1 \
      || { tail -n 20 "$WORK/logs/debootstrap.log" >&2
           skip "debootstrap could not build the arm64 root from $mirror (no mirror reachable? log: $WORK/logs/debootstrap.log)"; }
    chroot "$ROOT.partial" apt-get clean
    echo "Debian $RELEASE arm64, root version $ROOT_VERSION, built $(date -u +%Y-%m-%dT%H:%MZ) in $((SECONDS - PHASE_STARTED)) s" \
      >"$ROOT.partial/.edgeattn-root"
    remove_tree "$ROOT"
    mv "$ROOT.partial" "$ROOT"
    ROOT_STATE=built
  fi
  phase_done
}

# A board's /proc/cpuinfo. qemu 7 shows the x86 host's file to the guest, and onnxruntime's cpuinfo
# library, parsing it with sysfs mounted, crashes the process (SIGSEGV on `import onnxruntime`);
# without sysfs it gives up, prints three errors on every run and onnxruntime falls back to the
# auxiliary vector. This file is what the board's kernel shows (one entry per host core), so
# cpuinfo starts and knows the cores as on the board; the features it acts on come from the
# emulated CPU's auxiliary vector, as on hardware. (edgeattn tells emulation by QEMU_CPU.)
board_cpuinfo() {
  local cpu=$1 features midr i
  case $cpu in
    cortex-a76) features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
                midr="0x4 0xd0b 1" ;;  # Raspberry Pi 5: Cortex-A76 r4p1
    cortex-a72) features="fp asimd evtstrm crc32 cpuid"
                midr="0x0 0xd08 3" ;;  # Raspberry Pi 4: Cortex-A72 r0p3, no crypto extension
  esac
  set -- $midr
  for i in $(seq 0 $(($(nproc) - 1))); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\n' "$i" "$features"
    printf 'CPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$1" "$2" "$3"
  done
}

use_cpu() {  # the emulated CPU of the next in_root calls, and its /proc/cpuinfo
  BOARD_CPU=$1
  board_cpuinfo "$1" >"$WORK/cpuinfo-$1"
  mount --bind "$WORK/cpuinfo-$1" "$ROOT/proc/cpuinfo"
}

mount_root() {
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"  # e.g. a proxy's CA
  # onnxruntime refuses to open a model without procfs ("Secure opened-file canonicalization requires
  # procfs"); its cpuinfo library counts the cores in sysfs.
  mount -t proc proc "$ROOT/proc"
  mount --rbind /sys "$ROOT/sys"
  mount --make-rslave "$ROOT/sys"
  mount --bind /dev "$ROOT/dev"
  use_cpu "$BOARD_CPU"
  local machine
  machine=$(in_root uname -m) || skip "arm64 binaries do not run in the root (qemu/binfmt_misc not working)"
  [ "$machine" = aarch64 ] || die "the root reports $machine, not aarch64"
}

in_root() {  # a clean environment, as on a board: nothing of this machine's pip or Python settings
  env -i HOME=/root LANG=C.UTF-8 PATH=$BOARD_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    QEMU_CPU="$BOARD_CPU" chroot "$ROOT" "$@"
}

# -- what runs ---------------------------------------------------------------------------------

# name | convert options: a tiny model per lowering, the ring, a quantized cache, int4 weights, the demo's spec
TINY_FOLDERS=(
  "ort|tiny-llama --attention-op ort"
  "onnx|tiny-llama --attention-op onnx"
  "edgeattn-ops|tiny-llama --attention-op edgeattn"
  "ring|tiny-llama --window 16 --sinks 4"
  "int8-kv|tiny-llama --kv-cache int8"
  "int4-weights|tiny-llama --weights int4"
  "demo-spec|tiny-llama --window 16 --sinks 4 --kv-cache int8 --weights int4"
)
REAL_FOLDER="smollm2-demo|smollm2 --window 512 --sinks 4 --kv-cache int8 --weights int4"

build_wheel() {
  phase "wheel"
  local source=$WORK/source
  mkdir -p "$source" "$WORK/dist"
  # The working tree as a clean checkout of it holds it (tracked and untracked-but-not-ignored files
  # that exist), built outside the repo so that no build/ or egg-info lands in it.
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' file; do [ -f "$file" ] && printf '%s\0' "$file"; done \
    | xargs -0 cp --parents -t "$source")
  "$VENV_PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" "$source" >"$WORK/logs/wheel.log" 2>&1 \
    || { cat "$WORK/logs/wheel.log" >&2; die "building the wheel failed"; }
  WHEEL=$(ls "$WORK"/dist/edgeattn-*.whl)
  say "built $(basename "$WHEEL")"
  phase_done
}

convert_folders() {
  phase "convert on $HOST"
  local folders=("${TINY_FOLDERS[@]}") entry
  [ "${ARM64_REAL_MODEL:-0}" = 1 ] && folders+=("$REAL_FOLDER")
  # Two at a time (this machine has two cores); smollm2 calibrates on WikiText-2 where it is present.
  printf '%s\n' "${folders[@]}" | xargs -P 2 -I{} bash -c '
    name=${1%%|*}; args=${1#*|}; extra=()
    [ "${name#smollm2}" != "$name" ] && [ -f "$3" ] && extra=(--calibration-text "$3")
    "$2/.venv/bin/edgeattn" convert $args -o "$4/folders/$name" --json "${extra[@]}" \
      >"$4/logs/convert-$name.json" 2>"$4/logs/convert-$name.err" \
      || { echo "arm64 check: convert $name failed:" >&2; tail -n 5 "$4/logs/convert-$name.err" >&2; exit 255; }
    echo "arm64 check: converted $name: edgeattn convert $args"' _ {} "$REPO" "$REPO/../shared/data/wikitext-2/valid.txt" "$WORK" \
    || { say "FAILED: convert on $HOST (logs: $WORK/logs/convert-*.err)" >&2; exit 1; }  # a project failure, not setup
  NAMES=() INT4_NAMES=()
  for entry in "${folders[@]}"; do
    NAMES+=("${entry%%|*}")
    [[ $entry == *"|tiny-"*"--weights int4"* ]] && INT4_NAMES+=("${entry%%|*}")  # tiny ones: the real model is long
  done
  phase_done
}

install_runtime() {
  phase "install the runtime-only wheel in the root"
  remove_tree "$ROOT$CHECK_DIR"
  rm -rf --one-file-system "$ROOT$BOARD_VENV"
  mkdir -p "$ROOT$CHECK_DIR/reports"
  cp "$WHEEL" "$REPO/scripts/arm64_compare.py" "$ROOT$CHECK_DIR/"
  cp -r "$WORK/folders" "$ROOT$CHECK_DIR/folders"
  say "python3 -m venv $BOARD_VENV && pip install $(basename "$WHEEL")"
  in_root python3 -m venv "$BOARD_VENV"
  # pip's download cache stays in the cached root; the venv is new each run, as on a fresh board.
  # --no-compile: no bytecode for the thousand files never imported (onnxruntime's tools and
  # transformers helpers), which under emulation is most of pip's time; Python compiles what it imports.
  in_root pip install --quiet --no-compile "$CHECK_DIR/$(basename "$WHEEL")" \
    || skip "pip could not install the wheel's dependencies in the root (is PyPI reachable from here?)"
  in_root python -c 'import platform, onnxruntime, numpy, tokenizers
print(f"arm64 check: the root: {platform.machine()}, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
      f"numpy {numpy.__version__}, tokenizers {tokenizers.__version__}")'
  in_root python -c 'import importlib.util, sys
present = [name for name in ("torch", "transformers", "onnx", "onnxscript", "gguf") if importlib.util.find_spec(name)]
sys.exit(f"the runtime-only install has {present}" if present else 0)' || die "the runtime-only install pulled in the convert extra"
  say "runtime only: no torch, transformers, onnx, onnxscript or gguf in $BOARD_VENV"
  phase_done
}

validate_in_root() {  # validate --golden on each folder named; the report is validate-NAME.LABEL.json
  local label=$1 name status
  shift
  for name in "$@"; do
    say "edgeattn validate $name --golden ($label, QEMU_CPU=$BOARD_CPU)"
    status=0
    in_root edgeattn validate "$CHECK_DIR/folders/$name" --golden --threads $THREADS \
      --json "$CHECK_DIR/reports/validate-$name.$label.json" || status=$?
    [ $status = 0 ] || FAILED+=("validate --golden $name on $label (exit $status)")
  done
}

dump_in_root() {  # the runtime's logits for arm64_compare.py
  local label=$1
  shift
  in_root python "$CHECK_DIR/arm64_compare.py" dump --threads $THREADS -o "$CHECK_DIR/reports/logits-$label" "$@" \
    || FAILED+=("logits of $label")
}

run_checks() {
  phase "checks in the arm64 root"
  validate_in_root aarch64 "${NAMES[@]}"
  say "edgeattn generate ort"
  in_root edgeattn generate "$CHECK_DIR/folders/ort" "The capital of France is" --max-new-tokens 16 --threads $THREADS \
    || FAILED+=("generate ort on aarch64")
  local profiled=demo-spec
  [ "${ARM64_REAL_MODEL:-0}" = 1 ] && profiled=smollm2-demo
  say "edgeattn profile $profiled --target pi5"
  in_root edgeattn profile "$CHECK_DIR/folders/$profiled" --target pi5 --contexts 64,128 --prompt-lengths 32 \
    --repeats 3 --quiet --json "$CHECK_DIR/reports/profile-$profiled.aarch64.json" || FAILED+=("profile $profiled on aarch64")
  say "runtime logits on aarch64 for the comparison"
  dump_in_root aarch64 "${NAMES[@]/#/$CHECK_DIR/folders/}"
  if [ ${#INT4_NAMES[@]} -gt 0 ]; then
    say "int4 folders with KleidiAI off, and on a Pi 4's $OTHER_CPU"
    dump_in_root aarch64-kleidiai-off --disable-kleidiai "${INT4_NAMES[@]/#/$CHECK_DIR/folders/}"
    use_cpu "$OTHER_CPU"
    validate_in_root "aarch64-$OTHER_CPU" "${INT4_NAMES[@]}"
    dump_in_root "aarch64-$OTHER_CPU" "${INT4_NAMES[@]/#/$CHECK_DIR/folders/}"
  fi
  cp -r "$ROOT$CHECK_DIR/reports/." "$WORK/reports/"
  phase_done
}

compare_with_host() {
  phase "the same on $HOST, and the comparison"
  local name status
  for name in "${NAMES[@]}"; do
    status=0
    "$REPO/.venv/bin/edgeattn" validate "$WORK/folders/$name" --golden --threads $THREADS \
      --json "$WORK/reports/validate-$name.$HOST.json" >"$WORK/logs/validate-$name.$HOST.txt" || status=$?
    [ $status = 0 ] || FAILED+=("validate --golden $name on $HOST (exit $status)")
  done
  "$VENV_PY" "$REPO/scripts/arm64_compare.py" dump --threads $THREADS -o "$WORK/reports/logits-$HOST" \
    "${NAMES[@]/#/$WORK/folders/}" >/dev/null || FAILED+=("logits of $HOST")
  "$VENV_PY" "$REPO/scripts/arm64_compare.py" compare "$WORK/reports" "${NAMES[@]}" \
    --variants kleidiai-off "$OTHER_CPU" --variant-folders "${INT4_NAMES[@]}" || FAILED+=("$HOST against aarch64")
  phase_done
}

main() {
  host_setup
  [ -x "$VENV_PY" ] || die "$REPO/.venv is missing: run make install first"
  WORK=${ARM64_WORK:-$(mktemp -d /tmp/edgeattn-arm64.XXXXXX)}
  [ ! -e "$WORK/folders" ] || die "$WORK already holds a run: give ARM64_WORK a new folder"
  mkdir -p "$WORK/folders" "$WORK/reports" "$WORK/logs" "$CACHE"
  say "work folder $WORK"
  exec 9>"$CACHE/arm64.lock"
  flock 9  # one run at a time uses the cached root
  trap cleanup EXIT
  trap 'exit 130' INT
  build_root
  build_wheel
  convert_folders
  mount_root
  install_runtime
  run_checks
  compare_with_host
  remove_tree "$ROOT$CHECK_DIR"
  local cpu
  times >"$WORK/logs/times"  # the builtin in this shell: a subshell's would not count this run's children
  cpu=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); total += t[1] * 60 + t[2] } printf "%.0f", total }' \
    "$WORK/logs/times")
  say "seconds: root ${TOOK[arm64 root]} ($ROOT_STATE), wheel ${TOOK[wheel]}, convert ${TOOK[convert on $HOST]}," \
    "install ${TOOK[install the runtime-only wheel in the root]}, aarch64 checks ${TOOK[checks in the arm64 root]}," \
    "$HOST checks and comparison ${TOOK[the same on $HOST, and the comparison]}; total $((SECONDS - STARTED))" \
    "(CPU time of everything it ran: $cpu s)"
  if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'arm64 check: FAILED: %s\n' "${FAILED[@]}" >&2
    exit 1
  fi
  say "passed: ${#NAMES[@]} folders converted on $HOST pass validate --golden on emulated aarch64 (reports: $WORK/reports)"
}

main "$@"
