#!/usr/bin/env bash
# Build (idempotently) and cache the e2e test guest: a Debian kernel and a
# busybox-static initramfs with the USB/SCSI/virtio/HID modules loaded by /init.
#
#   scripts/guest/build-guest.sh            build if missing, print the image dir
#   scripts/guest/build-guest.sh --force    rebuild even if cached
#   scripts/guest/build-guest.sh --print    print the cached image dir, build nothing (exit 1 if none)
#
# Cache: ${USBROAM_GUEST_CACHE:-<repo>/.cache/guest}/
#   debs/<pkg>.deb                    the downloaded kernel package (kept across rebuilds)
#   images/<kver>-<scripthash>/       vmlinuz, vmlinux (PVH ELF, when extractable), initramfs.gz, manifest.json
#   current -> images/<kver>-<hash>   the last image built (what the harness boots)
# The key is the kernel version + a hash of this script, so editing the
# script (module list, /init) or a new kernel in the archive rebuilds.
#
# Env: USBROAM_GUEST_CACHE (cache dir), USBROAM_GUEST_KERNEL_PKG (e.g.
# linux-image-6.1.0-56-amd64; default: what linux-image-amd64 depends on).
# Installs its apt prerequisites when run as root and they are missing.
set -euo pipefail

SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT_PATH")/../.." && pwd)"
CACHE="${USBROAM_GUEST_CACHE:-$REPO_ROOT/.cache/guest}"
MODE=build
case "${1:-}" in
  --force) MODE=force ;;
  --print) MODE=print ;;
  "") ;;
  *) echo "usage: $0 [--force|--print]" >&2; exit 2 ;;
esac

log() { echo "[build-guest] $*" >&2; }
now_ms() { date +%s%3N; }
T0=$(now_ms)

# Modules wanted in the guest; dependencies are resolved with modprobe.
MODULES=(
  xhci-pci ehci-pci usb-storage uas sd_mod
  virtio_pci 9pnet_virtio 9p virtio_net
  cdc-acm usbhid hid-generic evdev
  ftdi_sio
)

if [[ $MODE == print ]]; then
  if [[ -f "$CACHE/current/manifest.json" ]]; then readlink -f "$CACHE/current"; exit 0; fi
  exit 1
fi

# ---- prerequisites ---------------------------------------------------------
APT_PKGS=(qemu-system-x86 qemu-utils busybox-static kmod xz-utils zstd)
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v depmod >/dev/null && command -v modprobe >/dev/null || missing+=(kmod)
command -v xz >/dev/null || missing+=(xz-utils)
command -v zstd >/dev/null || missing+=(zstd)
apt_updated=0
apt_update() {
  if [[ $apt_updated == 0 ]]; then log "apt-get update"; apt-get update -qq >&2; apt_updated=1; fi
}
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    log "missing packages: ${missing[*]} (run as root, or: apt-get install --no-install-recommends ${APT_PKGS[*]})"
    exit 1
  fi
  apt_update
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install --no-install-recommends -y -qq "${missing[@]}" >&2
fi
BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || { log "no $BUSYBOX"; exit 1; }
file_is_static() { ! ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || { log "$BUSYBOX is not static (install busybox-static)"; exit 1; }

# The guest's helper programs are part of the key: editing one rebuilds the image.
USBCTL_SRC="$(dirname "$SCRIPT_PATH")/usbctl.c"
SCRIPT_HASH="$(cat "$SCRIPT_PATH" "$USBCTL_SRC" | sha256sum | cut -c1-12)"

# Fast path: the current image was built by this script and the apt lists have
# not changed since (so linux-image-amd64 cannot point at a newer kernel).
CUR="$CACHE/current/manifest.json"
if [[ $MODE == build && -z ${USBROAM_GUEST_KERNEL_PKG:-} && -f $CUR ]] \
   && grep -q "\"scriptHash\": \"$SCRIPT_HASH\"" "$CUR" \
   && [[ -z "$(find /var/lib/apt/lists -maxdepth 1 \( -name '*Packages*' -o -path /var/lib/apt/lists \) -newer "$CUR" 2>/dev/null | head -1)" ]]; then
  log "cached: $(readlink -f "$CACHE/current")"
  readlink -f "$CACHE/current"
  exit 0
fi

# ---- which kernel ----------------------------------------------------------
resolve_kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
KPKG="${USBROAM_GUEST_KERNEL_PKG:-}"
if [[ -z $KPKG ]]; then
  KPKG="$(resolve_kernel_pkg || true)"
  if [[ -z $KPKG && $(id -u) == 0 ]]; then apt_update; KPKG="$(resolve_kernel_pkg || true)"; fi
fi
if [[ -z $KPKG ]]; then
  # No apt lists and not root: fall back to whatever was built last.
  if [[ -f "$CACHE/current/manifest.json" ]]; then log "cannot resolve kernel package; using cached image"; readlink -f "$CACHE/current"; exit 0; fi
  log "cannot resolve the package linux-image-amd64 depends on (apt-get update?)"; exit 1
fi
KVER="${KPKG#linux-image-}"
KEY="$KVER-$SCRIPT_HASH"
IMG="$CACHE/images/$KEY"

if [[ $MODE != force && -f "$IMG/manifest.json" && -f "$IMG/vmlinuz" && -f "$IMG/initramfs.gz" ]]; then
  ln -sfn "images/$KEY" "$CACHE/current"
  touch "$IMG/manifest.json" # checked against the apt lists: re-arms the fast path
  log "cached: $IMG"
  echo "$IMG"
  exit 0
fi

mkdir -p "$CACHE/debs" "$CACHE/images"
# One builder at a time per cache dir.
exec 9>"$CACHE/.build.lock"
flock 9
if [[ $MODE != force && -f "$IMG/manifest.json" ]]; then
  ln -sfn "images/$KEY" "$CACHE/current"; echo "$IMG"; exit 0
fi

# ---- download + unpack the kernel -----------------------------------------
DEB="$(ls "$CACHE/debs/${KPKG}_"*.deb 2>/dev/null | head -1 || true)"
if [[ -z $DEB ]]; then
  log "downloading $KPKG (~71 MB)"
  tdl=$(now_ms)
  dl="$(mktemp -d "$CACHE/debs/.dl.XXXXXX")"
  chmod 777 "$dl" # apt-get download as root drops privileges to _apt
  (cd "$dl" && apt-get download -q "$KPKG" >&2) || {
    if [[ $(id -u) == 0 && $apt_updated == 0 ]]; then apt_update; (cd "$dl" && apt-get download -q "$KPKG" >&2); else exit 1; fi
  }
  mv "$dl"/*.deb "$CACHE/debs/"
  rmdir "$dl"
  DEB="$(ls "$CACHE/debs/${KPKG}_"*.deb | head -1)"
  log "downloaded $(du -h "$DEB" | cut -f1) in $(( ($(now_ms) - tdl) / 1000 )) s"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/usbroam-guest-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
log "unpacking $(basename "$DEB")"
dpkg-deb -x "$DEB" "$WORK/kernel"
VMLINUZ="$(ls "$WORK/kernel/boot/vmlinuz-$KVER")"
depmod -b "$WORK/kernel" "$KVER"

# ---- resolve modules -------------------------------------------------------
ORDER=()
declare -A SEEN=()
for m in "${MODULES[@]}"; do
  while read -r kind path _; do
    [[ $kind == insmod ]] || continue
    [[ -n ${SEEN[$path]:-} ]] && continue
    SEEN[$path]=1
    ORDER+=("$path")
  done < <(modprobe -d "$WORK/kernel" -S "$KVER" --show-depends "$m")
done

# ---- initramfs tree --------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,root,lib/modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for a in $("$BUSYBOX" --list); do
  [[ $a == busybox ]] && continue # else /bin/busybox becomes a self-link (ELOOP, -40)
  ln -s busybox "$ROOT/bin/$a"
done
: > "$ROOT/etc/modules.order"
names=()
for p in "${ORDER[@]}"; do
  base="$(basename "$p")"
  name="${base%%.ko*}"
  case "$p" in
    *.ko.xz) xz -dc "$p" > "$ROOT/lib/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$p" > "$ROOT/lib/modules/$name.ko" ;;
    *.ko.gz) gzip -dc "$p" > "$ROOT/lib/modules/$name.ko" ;;
    *) cp "$p" "$ROOT/lib/modules/$name.ko" ;;
  esac
  echo "$name" >> "$ROOT/etc/modules.order"
  names+=("$name")
done
# usbctl (scripts/guest/usbctl.c): concurrent usbfs control transfers, which busybox cannot do.
if command -v gcc >/dev/null; then
  gcc -static -Os -s -o "$ROOT/bin/usbctl" "$USBCTL_SRC" >&2 || { log "gcc failed on $USBCTL_SRC"; exit 1; }
else
  log "no gcc: the guest has no usbctl (tests of concurrent control transfers fail)"
fi
echo "usbroam-guest" > "$ROOT/etc/hostname"
echo "root:x:0:0:root:/root:/bin/sh" > "$ROOT/etc/passwd"

cat > "$ROOT/init" <<'INIT'
#!/bin/sh
# usbroam e2e guest /init: mount, load modules, then a shell on ttyS0.
export PATH=/bin:/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# Keep kernel messages off the console (the harness reads dmesg instead).
echo 1 > /proc/sys/kernel/printk
hostname -F /etc/hostname
while read -r m; do
  insmod "/lib/modules/$m.ko" 2>>/run/insmod.log || echo "$m" >> /run/insmod-failed
done < /etc/modules.order
# No echo: the harness sends commands and reads only their output.
stty -F /dev/ttyS0 -echo 2>/dev/null
echo "USBROAM-GUEST-READY $(cut -d' ' -f1 /proc/uptime)"
# The console shell: a session leader with ttyS0 as its controlling tty (cttyhack), interactive
# (-i: job control, ^C interrupts only the running command, errors do not end it), reading its
# commands from ttyS0 opened as a script file, NOT from stdin. An interactive ash that reads
# stdin with tty echo off (and ICANON on) skips line editing and reads with stdio fgets(), and a
# read interrupted by a signal (ash installs its handlers without SA_RESTART) comes back as
# end of input: the shell exits (status 0). SIGCHLD from a background job (`cat /dev/ttyACM0 &`)
# that ends while the shell waits for its next command was enough, and as the exiting shell
# leads the tty's session, the kernel hangs ttyS0 up, flushing the harness's next command that
# was already on its way. A script file is read with EINTR-retrying read(2) instead.
while true; do
  PS1= PS2= setsid cttyhack /bin/sh -i /dev/ttyS0 2>&1
  echo "USBROAM-GUEST-SHELL-RESTART status=$?"
  stty -F /dev/ttyS0 -echo 2>/dev/null
done
INIT
chmod 755 "$ROOT/init"

mkdir -p "$WORK/out"
if (cd "$ROOT" && find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -9 > "$WORK/out/initramfs.gz") && [[ -s "$WORK/out/initramfs.gz" ]]; then :; else
  log "busybox cpio failed"; exit 1
fi
cp "$VMLINUZ" "$WORK/out/vmlinuz"
# Also the uncompressed ELF kernel: with its PVH entry note QEMU boots it
# directly (-kernel vmlinux), skipping the bzImage's xz decompression, which
# costs ~3.5 s under TCG (8 s -> 4.5 s to a shell).
PVH=false
for off in $(LC_ALL=C grep -aobUP '\xfd7zXZ\x00' "$VMLINUZ" | cut -d: -f1); do
  if tail -c +$((off + 1)) "$VMLINUZ" | xz -dc 2>/dev/null > "$WORK/vmlinux"; [[ "$(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]]; then
    # XEN_ELFNOTE_PHYS32_ENTRY (type 0x12, name "Xen")
    if LC_ALL=C grep -qaUP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$WORK/vmlinux"; then
      mv "$WORK/vmlinux" "$WORK/out/vmlinux"
      PVH=true
    fi
    break
  fi
done
rm -f "$WORK/vmlinux"
log "PVH ELF kernel: $PVH"
cat > "$WORK/out/manifest.json" <<JSON
{
  "kernelPackage": "$KPKG",
  "kernelVersion": "$KVER",
  "scriptHash": "$SCRIPT_HASH",
  "deb": "$(basename "$DEB")",
  "pvh": $PVH,
  "modules": [$(printf '"%s",' "${names[@]}" | sed 's/,$//')],
  "builtAt": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
JSON
rm -rf "$IMG"
mkdir -p "$(dirname "$IMG")"
mv "$WORK/out" "$IMG"
ln -sfn "images/$KEY" "$CACHE/current"
# Older images of this cache are stale now; keep only the current one.
for d in "$CACHE/images"/*; do [[ $d == "$IMG" ]] || rm -rf "$d"; done
# Old kernel debs too.
for d in "$CACHE/debs"/*.deb; do [[ $d == "$DEB" ]] || rm -f "$d"; done
log "built $IMG: initramfs $(du -h "$IMG/initramfs.gz" | cut -f1), ${#names[@]} modules, in $(( ($(now_ms) - T0) / 1000 )) s"
echo "$IMG"
