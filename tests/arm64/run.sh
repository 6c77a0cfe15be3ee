#!/usr/bin/env bash
# Run edge-imagegen the way a Raspberry Pi user does, on an emulated arm64 Debian bookworm.
#
#   sudo tests/arm64/run.sh                 # quickstart.sh, then test.sh -q (whole suite), then repro
#   sudo tests/arm64/run.sh tests/test_pipeline.py -k seed    # arguments replace "-q": passed to pytest
#
# Needs root (debootstrap, chroot, mounts), debootstrap and qemu-user-static with binfmt_misc
# registered for aarch64 (Debian: apt-get install debootstrap qemu-user-static binfmt-support).
# Not part of CI: the whole run takes tens of minutes under emulation.
#
# 1. A Debian bookworm arm64 root is built once with `debootstrap --arch=arm64 --foreign` plus the
#    second stage through qemu, and cached in $EDGE_ARM64_CACHE (default
#    /var/cache/edge-imagegen/arm64-bookworm). It holds what a Raspberry Pi OS Lite image has
#    (python3, ca-certificates, git, sudo), not python3-venv or mosquitto: quickstart.sh and test.sh
#    install those with apt-get, as they do on a board.
# 2. Each run works on a fresh copy of that root (the cached one stays pristine; pip's and apt's
#    download caches are kept between runs) with /proc, /sys, /dev bind-mounted (unmounted on exit;
#    the script also runs in its own mount namespace, so nothing leaks if it is killed). The
#    repository is copied in (tracked + untracked-not-ignored files of the working tree, or
#    `git archive HEAD` with EDGE_ARM64_SOURCE=head), to /root/edge-imagegen.
# 3. Inside the chroot, as root: ./quickstart.sh, then ./test.sh -q (or ./test.sh "$@"), then
#    tests/arm64/repro.py record. On the host, when .venv/bin/python (or $EDGE_ARM64_NATIVE_PY)
#    exists, repro.py records the native side too and compares (latents bit for bit, images by max abs difference and PSNR).
# 4. Logs and a summary (tests passed/failed, image written, wall time of each phase) go to
#    $EDGE_ARM64_LOGS (default /var/cache/edge-imagegen/logs/<UTC time>/); summary.txt is printed.
#
# Environment: EDGE_ARM64_CACHE, EDGE_ARM64_LOGS, EDGE_ARM64_MIRROR (default
# http://deb.debian.org/debian), EDGE_ARM64_SOURCE (worktree|head), EDGE_ARM64_KEEP=1 (reuse the
# previous run's root, venv included, instead of a fresh copy), EDGE_ARM64_SKIP (comma list of
# phases to skip: quickstart, tests, repro), EDGE_ARM64_HOST_CA=0 (do not copy the host's
# /usr/local/share/ca-certificates into the root; they are copied by default so that pip works
# behind a TLS-intercepting proxy).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${EDGE_ARM64_CACHE:-/var/cache/edge-imagegen/arm64-bookworm}
CACHE_BASE=$(dirname "$CACHE")
WORK=${CACHE}.run
MIRROR=${EDGE_ARM64_MIRROR:-http://deb.debian.org/debian}
SOURCE=${EDGE_ARM64_SOURCE:-worktree}
SKIP=",${EDGE_ARM64_SKIP:-},"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGS=${EDGE_ARM64_LOGS:-$CACHE_BASE/logs/$STAMP}
# What Raspberry Pi OS Lite (bookworm) already has; the project's scripts install the rest.
BASE_PACKAGES=python3,ca-certificates,git,sudo,procps
IN_REPO=/root/edge-imagegen
# The CPU qemu emulates: a Pi 5's, so that onnxruntime picks the kernels it picks on the board
# (NEON + dotprod + fp16; qemu's default "max" would add SVE, i8mm and bf16).
QEMU_CPU=${EDGE_ARM64_QEMU_CPU:-cortex-a76}
# The daemon tests' deadlines are sized for real hardware; emulated steps are ~100-500x slower.
TIMEOUT_SCALE=${EDGE_TEST_TIMEOUT_SCALE:-100}
NATIVE_PY=${EDGE_ARM64_NATIVE_PY:-$REPO/.venv/bin/python}  # the host's side of the repro comparison

die() { echo "arm64: $*" >&2; exit 1; }
log() { echo "[arm64 $(date -u +%H:%M:%S)] $*" >&2; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts): sudo $0 $*"

# `nice -n 19 tests/arm64/run.sh` alone does not make way for other sessions' processes when the
# kernel schedules by autogroup (sched_autogroup_enabled=1, Debian's default): CPU time is shared
# between sessions first and nice only ranks tasks within one. So the session's autogroup gets
# this process's niceness too (the shell that started the script is in that session as well).
if [ -z "${EDGE_ARM64_IN_NS:-}" ] && [ "$(nice)" -gt 0 ] && [ -w /proc/self/autogroup ]; then
  echo "$(nice)" > /proc/self/autogroup 2>/dev/null || true
fi

# Own mount namespace: the bind mounts vanish with this process even on SIGKILL.
if [ -z "${EDGE_ARM64_IN_NS:-}" ] && command -v unshare >/dev/null; then
  export EDGE_ARM64_IN_NS=1
  exec unshare --mount --propagation private -- "$0" "$@"
fi

command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install debootstrap"
if [ "$(uname -m)" != aarch64 ]; then
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "no binfmt_misc entry for aarch64:" \
    "apt-get install qemu-user-static binfmt-support (and mount binfmt_misc)"
fi

mounts_under() { findmnt -rn -o TARGET | awk -v p="$1/" 'index($0 "/", p) == 1' | sort -r; }
unmount_all() {  # deepest first; lazy as a last resort
  local m
  for m in $(mounts_under "$1"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
}
safe_rm() {  # never rm -rf through a bind mount of the host's /dev or /sys
  unmount_all "$1"
  [ -z "$(mounts_under "$1")" ] || die "still mounted under $1, not removing it"
  rm -rf --one-file-system "$1"
}

CHROOT_MOUNTED=""
cleanup() { [ -z "$CHROOT_MOUNTED" ] || unmount_all "$CHROOT_MOUNTED"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

mount_chroot() {  # mount_chroot ROOT
  local r=$1
  CHROOT_MOUNTED=$r
  mount -t proc proc "$r/proc"
  mount --rbind /sys "$r/sys" && mount --make-rslave "$r/sys"
  mount --rbind /dev "$r/dev" && mount --make-rslave "$r/dev"
  if [ "$(uname -m)" != aarch64 ]; then
    # qemu-user (7.2) passes the host's x86 /proc/cpuinfo through; the cpuinfo library inside
    # onnxruntime's aarch64 wheel parses it at import and crashes (SIGSEGV). A Pi 5's own
    # (Cortex-A76) cpuinfo, one block per host CPU so that it agrees with /sys, stands in for it.
    fake_cpuinfo > "$CACHE_BASE/cpuinfo.arm64"
    mount --bind "$CACHE_BASE/cpuinfo.arm64" "$r/proc/cpuinfo"
  fi
  mkdir -p "$CACHE_BASE/pip-cache" "$CACHE_BASE/apt-archives/partial" "$r/root/.cache/pip"
  mount --bind "$CACHE_BASE/pip-cache" "$r/root/.cache/pip"
  mount --bind "$CACHE_BASE/apt-archives" "$r/var/cache/apt/archives"
}

fake_cpuinfo() {  # /proc/cpuinfo of a Raspberry Pi 5 (4x Cortex-A76), for the host's CPU count
  local n i
  n=$(getconf _NPROCESSORS_CONF)
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" \
      "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
    printf 'CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n'
  done
  printf 'Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0 (emulated by qemu-user)\n'
}

in_chroot() {  # in_chroot ROOT COMMAND...: a login-like environment, nothing from the host's
  local r=$1; shift
  env -i HOME=/root USER=root LOGNAME=root TERM=dumb LANG=C.UTF-8 \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      PIP_DEFAULT_TIMEOUT=120 PIP_DISABLE_PIP_VERSION_CHECK=1 QEMU_CPU="$QEMU_CPU" \
      EDGE_TEST_TIMEOUT_SCALE="$TIMEOUT_SCALE" \
      chroot "$r" "$@"
}

copy_host_config() {  # DNS, and a site CA (TLS-intercepting proxies) so that apt and pip work
  local r=$1
  cp -L /etc/resolv.conf "$r/etc/resolv.conf"
  if [ "${EDGE_ARM64_HOST_CA:-1}" = 1 ] && ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    mkdir -p "$r/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$r/usr/local/share/ca-certificates/"
    in_chroot "$r" update-ca-certificates >/dev/null 2>&1 || log "update-ca-certificates failed"
  fi
}

build_root() {
  local tmp=${CACHE}.tmp
  log "building the arm64 bookworm root in $CACHE (once; about 5 minutes)"
  safe_rm "$tmp"
  mkdir -p "$tmp"
  debootstrap --arch=arm64 --foreign --variant=minbase --include="$BASE_PACKAGES" \
      bookworm "$tmp" "$MIRROR"
  # Without binfmt's F flag the interpreter must be inside the root.
  if [ "$(uname -m)" != aarch64 ] && [ -x /usr/bin/qemu-aarch64-static ]; then
    cp /usr/bin/qemu-aarch64-static "$tmp/usr/bin/"
  fi
  in_chroot "$tmp" /debootstrap/debootstrap --second-stage
  cat > "$tmp/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  echo edge-pi > "$tmp/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 edge-pi\n::1 localhost\n' > "$tmp/etc/hosts"
  # A Pi image has the system's locale and a pi user; the scripts are run as root here (sudo cannot
  # run setuid under qemu-user without binfmt's C flag), so the user only documents the layout.
  in_chroot "$tmp" useradd -m -s /bin/bash pi || true
  in_chroot "$tmp" python3 --version
  date -u +%FT%TZ > "$tmp/.edge-imagegen-root"
  mv "$tmp" "$CACHE"
}

# --------------------------------------------------------------------------------------------
main() {  # a function, so that bash has read all of it before editing the file can matter
  mkdir -p "$CACHE_BASE" "$LOGS"
  exec 9>"$CACHE_BASE/.run.lock"  # one run at a time: each replaces the working root
  flock -n 9 || die "another tests/arm64/run.sh is using $CACHE_BASE"
  SUMMARY=$LOGS/summary.txt
  : > "$SUMMARY"
  sum() { echo "$*" | tee -a "$SUMMARY"; }
  now() { date +%s.%N; }
  elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }
  fmt() { awk -v s="$1" 'BEGIN { printf "%dm%02ds", s / 60, s % 60 }'; }

  TOTAL0=$(now)
  tree="$(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null || echo '?')"
  dirty="$(git -C "$REPO" status --short 2>/dev/null | wc -l)"
  sum "edge-imagegen arm64 run $STAMP"
  sum "host: $(uname -m), $(nproc) cores; $(qemu-aarch64-static --version 2>/dev/null | head -1), -cpu $QEMU_CPU"
  sum "tree: $tree (+$dirty changed/untracked paths in the working tree; source=$SOURCE)"

  if [ ! -f "$CACHE/.edge-imagegen-root" ]; then
    t=$(now)
    build_root 2>&1 | tee "$LOGS/build-root.log" >&2
    sum "phase build-root: $(fmt "$(elapsed "$t")") (debootstrap, cached in $CACHE from now on)"
  else
    sum "phase build-root: cached ($CACHE, built $(cat "$CACHE/.edge-imagegen-root"))"
  fi

  t=$(now)
  if [ "${EDGE_ARM64_KEEP:-0}" = 1 ] && [ -d "$WORK" ]; then
    log "reusing $WORK (EDGE_ARM64_KEEP=1)"
  else
    log "fresh copy of the root in $WORK"
    safe_rm "$WORK"
    cp -a "$CACHE" "$WORK"
  fi
  copy_host_config "$WORK"
  # The repository, as a clone would have it. With EDGE_ARM64_KEEP=1 its .venv survives the copy
  # (make_venv then only reinstalls the package), as the header promises.
  if [ "${EDGE_ARM64_KEEP:-0}" = 1 ] && [ -d "$WORK$IN_REPO/.venv" ]; then
    rm -rf "$WORK/root/.edge-venv-kept"
    mv "$WORK$IN_REPO/.venv" "$WORK/root/.edge-venv-kept"
  fi
  rm -rf "$WORK$IN_REPO"
  mkdir -p "$WORK$IN_REPO"
  [ ! -d "$WORK/root/.edge-venv-kept" ] || mv "$WORK/root/.edge-venv-kept" "$WORK$IN_REPO/.venv"
  if [ "$SOURCE" = head ]; then
    git -C "$REPO" archive --format=tar HEAD | tar -xf - -C "$WORK$IN_REPO"
  else
    (cd "$REPO" && git ls-files -z -co --exclude-standard \
       | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
       | tar --null -T - -cf -) | tar -xf - -C "$WORK$IN_REPO"
  fi
  mount_chroot "$WORK"
  sum "phase prepare: $(fmt "$(elapsed "$t")") (root copy, repository copied in)"
  sum "arm64: $(in_chroot "$WORK" uname -m), $(in_chroot "$WORK" python3 --version 2>&1)," \
      "Debian $(cat "$WORK/etc/debian_version")"

  STATUS=0
  run_phase() {  # run_phase NAME COMMAND...: inside the chroot, in the repository; log + time
    local name=$1; shift
    local t0 rc=0
    t0=$(now)
    log "phase $name: $*"
    in_chroot "$WORK" /bin/bash -c "cd $IN_REPO && $*" > "$LOGS/$name.log" 2>&1 || rc=$?
    PHASE_SECONDS=$(elapsed "$t0")
    PHASE_RC=$rc
    [ "$rc" -eq 0 ] || STATUS=1
    return 0
  }

  if [[ $SKIP != *,quickstart,* ]]; then
    run_phase quickstart ./quickstart.sh
    image=$(grep -E '\.png$' "$LOGS/quickstart.log" | tail -1 || true)
    case $image in /*) f=$WORK$image ;; *) f=$WORK$IN_REPO/$image ;; esac
    if [ -n "$image" ] && [ -f "$f" ]; then
      cp "$f" "$LOGS/"
      info=$(python3 -c 'import struct, sys; d = open(sys.argv[1], "rb").read(); w, h = struct.unpack(">II", d[16:24]); print(f"{w}x{h} PNG, {len(d)} bytes")' "$f" 2>/dev/null || true)
      sum "phase quickstart: $(fmt "$PHASE_SECONDS") rc=$PHASE_RC image written: $image ($info)"
    else
      sum "phase quickstart: $(fmt "$PHASE_SECONDS") rc=$PHASE_RC NO IMAGE (see $LOGS/quickstart.log)"
    fi
  fi

  if [[ $SKIP != *,tests,* ]]; then
    if [ $# -gt 0 ]; then args=$(printf '%q ' "$@"); else args=-q; fi
    run_phase tests "./test.sh $args -p no:cacheprovider --durations=15"
    line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)|(passed|failed|error).* in [0-9.]+s' \
           "$LOGS/tests.log" | tail -1 || true)
    sum "phase tests (./test.sh $args): $(fmt "$PHASE_SECONDS") rc=$PHASE_RC: ${line:-no pytest summary, see $LOGS/tests.log}"
    sum "wheels: $(in_chroot "$WORK" "$IN_REPO/.venv/bin/python" -m pip list --format=freeze 2>/dev/null \
      | grep -iE '^(onnxruntime|onnx|numpy|pillow|paho-mqtt|pyyaml|pytest)==' | tr '\n' ' ')"
  fi

  if [[ $SKIP != *,repro,* ]]; then
    run_phase repro ".venv/bin/python tests/arm64/repro.py record --out /tmp/repro-arm64"
    rm -rf "$LOGS/repro-arm64"
    cp -a "$WORK/tmp/repro-arm64" "$LOGS/repro-arm64" 2>/dev/null || true
    sum "phase repro (arm64 record): $(fmt "$PHASE_SECONDS") rc=$PHASE_RC"
    if [ -x "$NATIVE_PY" ] && [ -d "$LOGS/repro-arm64" ]; then
      # PYTHONPATH: the working tree's edge/, the code the arm64 side installed, not whatever
      # the host's .venv was last installed from.
      t=$(now)
      PYTHONPATH="$REPO" "$NATIVE_PY" "$REPO/tests/arm64/repro.py" record --out "$LOGS/repro-native" \
        > "$LOGS/repro-native.log" 2>&1 || STATUS=1
      sum "phase repro (native record, $(uname -m)): $(fmt "$(elapsed "$t")")"
      if "$NATIVE_PY" "$REPO/tests/arm64/repro.py" compare \
           "$LOGS/repro-native" "$LOGS/repro-arm64" > "$LOGS/repro-compare.txt" 2>&1; then :; else STATUS=1; fi
      sed 's/^/  /' "$LOGS/repro-compare.txt" | tee -a "$SUMMARY"
    else
      sum "  (native side: run ./test.sh once on the host for .venv, then"
      sum "   .venv/bin/python tests/arm64/repro.py record --out /tmp/repro-native &&"
      sum "   .venv/bin/python tests/arm64/repro.py compare /tmp/repro-native $LOGS/repro-arm64)"
    fi
  fi

  sum "total: $(fmt "$(elapsed "$TOTAL0")") under qemu-user emulation; logs in $LOGS"
  cat "$SUMMARY" > "$CACHE_BASE/logs/latest-summary.txt" 2>/dev/null || true
  return $STATUS
}; main "$@"; exit $?  # one line: bash has read it all before main runs
