#!/usr/bin/env bash
# Build the test guest of vmdp: a Debian kernel and an initramfs running the real QEMU guest agent.
#
#   scripts/build-test-guest.sh [CACHE_DIR]
#
# CACHE_DIR defaults to $VMDP_GUEST_CACHE, else $XDG_CACHE_HOME/vmdp-test-guest, else
# ~/.cache/vmdp-test-guest. It gets `vmlinuz` (the Debian bzImage), `vmlinux` (the same kernel
# uncompressed, an ELF with a PVH entry point that QEMU's -kernel boots without the decompressor:
# 3 s less under TCG; only for an xz or gzip bzImage), `initrd.img`, `manifest.txt` (the packages used) and `stamp` (this script's
# sha256 and the kernel meta package). A second run whose stamp matches does nothing.
#
# Everything comes from Debian packages fetched with `apt-get download` (nothing is installed on
# the host) and unpacked with `dpkg-deb -x` in a temporary directory:
#   - linux-image-<abi>-amd64 (what linux-image-amd64 depends on; $VMDP_GUEST_KERNEL_META names
#     another meta package, e.g. linux-image-cloud-amd64): vmlinuz and the modules virtio_pci,
#     virtio_blk, virtio_console, crc32c_generic, ext4 and their dependencies, but for those built
#     in (none in linux-image-amd64; ext4 in the cloud kernel);
#   - busybox-static: the shell and tools of /init; on the host it also writes the cpio archive;
#   - qemu-guest-agent: /usr/sbin/qemu-ga;
#   - e2fsprogs: mke2fs, for a real journalled ext4 (busybox's mke2fs makes ext2 only);
#   - the shared libraries of those two, with libc6: the Depends/PreDepends closure of their lib*
#     dependencies (libglib2.0-0, libnuma1, libudev1, liburing2, libext2fs2, libcom-err2,
#     libblkid1, libuuid1, libpcre2-8-0, libmount1, libselinux1, libffi8, zlib1g, libgcc-s1, ...).
#     The packaged ld.so resolves them, so the host's own libraries play no part.
# Host tools: apt-get, apt-cache, dpkg-deb, tar, gzip, flock, sha256sum, python3 (its lzma module).
#
# The guest's /init mounts proc, sys and devtmpfs, loads the modules, formats /dev/vda as ext4
# unless it holds an ext2/3/4 file system already, mounts it on /mnt, starts qemu-ga on the
# virtio-serial port named org.qemu.guest_agent.0, prints "vmdp-guest-ready" on the console, then
# appends a line to /mnt/log and syncs every 50 ms for ever, so the file system is always busy.
# Kernel command line: console=ttyS0 quiet panic=-1 (see src/vmdp/testing/guest.py).
set -euo pipefail

script="$(readlink -f "${BASH_SOURCE[0]}")"
cache="${1:-${VMDP_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmdp-test-guest}}"
meta="${VMDP_GUEST_KERNEL_META:-linux-image-amd64}"
stamp_want="$(sha256sum "$script" | cut -d' ' -f1) $meta"

fresh() { [ -s "$cache/vmlinuz" ] && [ -s "$cache/initrd.img" ] && [ "$(cat "$cache/stamp" 2>/dev/null)" = "$stamp_want" ]; }

fresh && exit 0
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # another build of the same cache may be running: wait for it
fresh && exit 0

t0=$SECONDS
tmp="$(mktemp -d "${TMPDIR:-/tmp}/vmdp-guest-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
debs="$tmp/debs" x="$tmp/x" root="$tmp/root"
mkdir -p "$debs" "$x" "$root"

apt_opts=(-q)
# As root apt drops to the _apt user, who cannot write in our private temp dir: skip that step.
[ "$(id -u)" -eq 0 ] && apt_opts+=(-o APT::Sandbox::User=root)

# One pass over the dependency graph: the kernel package that the meta package depends on (its
# candidate), then the lib* dependencies of qemu-guest-agent and e2fsprogs and all they depend on.
resolve() {
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances "$meta" qemu-guest-agent e2fsprogs | awk -v meta="$meta" '
  /^[^ ]/ { pkg = $1; next }
  $1 ~ /^[|]?(Pre)?Depends:$/ && $2 !~ /^</ { deps[pkg] = deps[pkg] " " $2 }
  END {
    n = split(deps[meta], d, " ")
    for (i = 1; i <= n; i++) if (d[i] ~ /^linux-image-/) { print d[i]; break }
    split("qemu-guest-agent e2fsprogs", tools, " ")
    for (t in tools) {
      n = split(deps[tools[t]], d, " ")
      for (i = 1; i <= n; i++) if (d[i] ~ /^lib/ && !(d[i] in seen)) { seen[d[i]] = 1; queue[++q] = d[i] }
    }
    for (j = 1; j <= q; j++) {
      n = split(deps[queue[j]], d, " ")
      for (i = 1; i <= n; i++) if (!(d[i] in seen)) { seen[d[i]] = 1; queue[++q] = d[i] }
    }
    for (j = 1; j <= q; j++) print queue[j]
  }' || true
}
resolved="$(resolve 2>/dev/null)"
if [[ "$resolved" != linux-image-* ]] && [ "$(id -u)" -eq 0 ]; then
  apt-get update -q >&2 # apt's package lists may be missing or old
  resolved="$(resolve)"
fi
kpkg="$(echo "$resolved" | head -n1)"
mapfile -t libpkgs < <(echo "$resolved" | tail -n +2)
case "$kpkg" in
  linux-image-*) ;;
  *) echo "build-test-guest: apt cannot tell which kernel $meta depends on (as root: apt-get update)" >&2; exit 1 ;;
esac

pkgs=("$kpkg" busybox-static qemu-guest-agent e2fsprogs "${libpkgs[@]}")
echo "build-test-guest: downloading ${pkgs[*]}" >&2
(cd "$debs" && apt-get download "${apt_opts[@]}" "${pkgs[@]}" >&2)
for deb in "$debs"/*.deb; do
  case "${deb##*/}" in
    # Only what is used of the kernel (its full tree is 400 MB): vmlinuz, the lists of modules, and
    # the directories of the modules below and of their dependencies.
    linux-image-*)
      dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$x" --wildcards './boot/*' './lib/modules/*/modules.*' \
        './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/drivers/block/*' \
        './lib/modules/*/kernel/drivers/char/*' './lib/modules/*/kernel/fs/*' './lib/modules/*/kernel/lib/*' \
        './lib/modules/*/kernel/crypto/*'
      ;;
    *) dpkg-deb -x "$deb" "$x" ;;
  esac
  # shellcheck disable=SC2016 # dpkg-deb expands these
  dpkg-deb --show --showformat='${Package} ${Version}\n' "$deb" >>"$tmp/manifest"
done

bb="$x/bin/busybox"
kver="$(ls "$x/lib/modules")"
[ "$(echo "$kver" | wc -l)" -eq 1 ] || { echo "build-test-guest: not one kernel in $kpkg: $kver" >&2; exit 1; }
mdir="$x/lib/modules/$kver"

# --- the tree of the initramfs
mkdir -p "$root"/{bin,sbin,usr/sbin,etc,proc,sys,dev,mnt,run,tmp,var/lib,lib/modules}
ln -s ../run "$root/var/run"
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cp "$x/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
cp "$x/sbin/mke2fs" "$root/sbin/mke2fs"
cp "$x/etc/mke2fs.conf" "$root/etc/mke2fs.conf"

# Shared libraries, resolved by the packaged dynamic loader against the packaged libraries only.
ldso="$x/lib64/ld-linux-x86-64.so.2"
libpath="$x/lib/x86_64-linux-gnu:$x/usr/lib/x86_64-linux-gnu"
mkdir -p "$root/lib64" "$root/lib/x86_64-linux-gnu"
cp -L "$ldso" "$root/lib64/ld-linux-x86-64.so.2"
for bin in "$root/usr/sbin/qemu-ga" "$root/sbin/mke2fs"; do
  out="$("$ldso" --library-path "$libpath" --list "$bin")"
  if echo "$out" | grep -q 'not found'; then
    echo "build-test-guest: unresolved libraries of $bin:" >&2
    echo "$out" | grep 'not found' >&2
    exit 1
  fi
  for lib in $(echo "$out" | sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p'); do
    case "$lib" in
      */ld-linux-x86-64.so.2) ;; # copied to /lib64 above
      "$x"/*) cp -L "$lib" "$root/lib/x86_64-linux-gnu/${lib##*/}" ;;
      *) echo "build-test-guest: $bin resolved $lib outside the packages" >&2; exit 1 ;;
    esac
  done
done

# Kernel modules: each wanted one with its dependencies first, skipping those built in.
declare -A ko_of=() loaded=()
while IFS= read -r ko; do
  name="${ko##*/}" name="${name%.ko}"
  ko_of["${name//-/_}"]="${ko#"$mdir"/}"
done < <(find "$mdir/kernel" -name '*.ko')
declare -A is_builtin=()
while IFS= read -r ko; do
  name="${ko##*/}" name="${name%.ko}"
  is_builtin["${name//-/_}"]=1
done <"$mdir/modules.builtin"
order=()
want() {
  local m="${1//-/_}" dep
  [ -n "${loaded[$m]:-}" ] && return 0
  loaded[$m]=1
  [ -n "${is_builtin[$m]:-}" ] && return 0
  local ko="${ko_of[$m]:-}"
  [ -n "$ko" ] || { echo "build-test-guest: no module $m in what was extracted of $kpkg" >&2; exit 1; }
  for dep in $(tr '\0' '\n' <"$mdir/$ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
    want "$dep"
  done
  order+=("$ko")
}
# crc32c_generic: ext4's checksums ask for crc32c by alias, and nothing here runs modprobe for it
# (crc32c-intel would need SSE4.2, which TCG's default CPU lacks).
for m in virtio_pci virtio_blk virtio_console crc32c_generic ext4; do want "$m"; done
for ko in "${order[@]}"; do
  mkdir -p "$root/lib/modules/$(dirname "$ko")"
  cp "$mdir/$ko" "$root/lib/modules/$ko"
done
printf '%s\n' "${order[@]}" >"$root/etc/modules-load"

cat >"$root/init" <<'EOF'
#!/bin/sh
# vmdp test guest: see scripts/build-test-guest.sh
# busybox's shell runs its own applets first: the real mke2fs and qemu-ga are called by path.
export PATH=/sbin:/usr/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
say() {
  read -r up _ </proc/uptime
  echo "vmdp-guest: [$up] $*"
}
while read -r ko; do
  insmod "/lib/modules/$ko" || say "insmod $ko failed"
done </etc/modules-load
say "modules loaded"

i=0
until [ -b /dev/vda ] || [ $i -ge 100 ]; do sleep 0.05; i=$((i + 1)); done
if [ -b /dev/vda ]; then
  # ext2/3/4 superblock magic 0xEF53 at byte 1080
  magic="$(dd if=/dev/vda bs=1 skip=1080 count=2 2>/dev/null | hexdump -e '2/1 "%02x"')"
  if [ "$magic" != "53ef" ]; then
    say "formatting /dev/vda as ext4"
    # Its UUID and hash seed given: otherwise mke2fs waits 4 s for randomness (no entropy source here).
    uuid="$(cat /proc/sys/kernel/random/uuid)" seed="$(cat /proc/sys/kernel/random/uuid)"
    /sbin/mke2fs -q -F -t ext4 -L vmdp -U "$uuid" -E "hash_seed=$seed,lazy_itable_init=0,lazy_journal_init=0" /dev/vda ||
      say "mke2fs failed"
  fi
  if mount -t ext4 /dev/vda /mnt; then say "/dev/vda mounted on /mnt"; else say "cannot mount /dev/vda"; fi
else
  say "no /dev/vda"
fi

# The host announces the ports of a virtio-serial device after its driver is up: wait for ours.
port=""
i=0
while [ -z "$port" ] && [ $i -lt 200 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port="/dev/${p##*/}"
  done
  [ -n "$port" ] || sleep 0.05
  i=$((i + 1))
done
if [ -n "$port" ]; then
  i=0
  until [ -c "$port" ] || [ $i -ge 100 ]; do sleep 0.05; i=$((i + 1)); done
  mkdir -p /var/lib/qemu-ga
  /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /var/lib/qemu-ga &
  qga=$!
  # up once it holds the port open
  holds_port() {
    for fd in /proc/"$qga"/fd/*; do [ "$(readlink "$fd")" = "$port" ] && return 0; done
    return 1
  }
  i=0
  until holds_port || [ $i -ge 200 ]; do sleep 0.05; i=$((i + 1)); done
  if holds_port; then
    say "qemu-ga up on $port"
    echo vmdp-guest-ready
  else
    say "qemu-ga did not open $port"
  fi
else
  say "no virtio-serial port org.qemu.guest_agent.0"
fi

n=0
while :; do
  n=$((n + 1))
  read -r up _ </proc/uptime
  echo "$n $up" >>/mnt/log
  sync
  sleep 0.05
done
EOF
chmod 755 "$root/init"

# --- pack: cpio newc owned by root, gzip; then publish atomically
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$bb" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -6 >"$tmp/initrd.img"
cp "$x/boot/vmlinuz-$kver" "$tmp/vmlinuz"
# The same kernel uncompressed: an ELF that QEMU boots through its PVH entry point, skipping the
# decompressor (seconds under TCG). The bzImage holds it as an xz stream (linux-image-amd64) or a
# gzip one; other compressions (the cloud kernel's lz4) get no vmlinux, and the bzImage is booted.
python3 - "$tmp/vmlinuz" "$tmp/vmlinux" <<'PY'
import lzma
import sys
import zlib

data = open(sys.argv[1], "rb").read()
elf = b""
xz, gz = data.find(b"\xfd7zXZ\x00"), data.find(b"\x1f\x8b\x08\x00")
if xz >= 0:
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[xz:])
elif gz >= 0:
    elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[gz:])
if elf[:4] == b"\x7fELF":
    open(sys.argv[2], "wb").write(elf)
else:
    print("build-test-guest: vmlinuz holds no xz or gzip ELF kernel: no vmlinux", file=sys.stderr)
PY
rm -f "$cache/stamp"
mv -f "$tmp/vmlinuz" "$cache/vmlinuz"
rm -f "$cache/vmlinux"
[ ! -e "$tmp/vmlinux" ] || mv -f "$tmp/vmlinux" "$cache/vmlinux"
mv -f "$tmp/initrd.img" "$cache/initrd.img"
{ echo "kernel $kver"; sort "$tmp/manifest"; } >"$cache/manifest.txt"
echo "$stamp_want" >"$cache/stamp"
echo "build-test-guest: built $(cd "$cache" && echo vmlinu? initrd.img) in $cache ($kver) in $((SECONDS - t0))s" >&2
