#!/usr/bin/env bash
# Builds the example sched_ext schedulers (scx_simple, scx_qmap, scx_central,
# scx_flatcg) from the Debian kernel source tarball's tools/sched_ext, against
# the BTF of a ktstr-built kernel, and caches them per kernel.
#
# Usage: scripts/build-scx.sh [--vmlinux PATH] [--force]
#   vmlinux: --vmlinux, else $VMLINUX, else the newest */vmlinux in the ktstr
#            kernel cache ($KTSTR_CACHE_DIR, else $XDG_CACHE_HOME/ktstr/kernels,
#            else ~/.cache/ktstr/kernels). Never the host's /sys/kernel/btf:
#            the host kernel is not the one under test.
#   output:  $KTSTR_SCX_CACHE_DIR (default ~/.cache/ktstr/scx)/<kernel-key>/bin
#            The last line on stdout is that bin directory (for KTSTR_SCHEDULER_DIR).
# Idempotent: a stamp (vmlinux + source + this script) skips rebuilding.
set -euo pipefail

SCHEDS=(scx_simple scx_qmap scx_central scx_flatcg)
SRC_TARBALL=${KTSTR_SCX_SOURCE:-/usr/src/linux-source-6.12.tar.xz}
CLANG_SUFFIX=${KTSTR_SCX_LLVM_SUFFIX:--16}
JOBS=${JOBS:-2}
VMLINUX_ARG=${VMLINUX:-}
FORCE=0

while [ $# -gt 0 ]; do
	case "$1" in
	--vmlinux) VMLINUX_ARG=$2; shift 2 ;;
	--force) FORCE=1; shift ;;
	-h|--help) sed -n '2,14p' "$0"; exit 0 ;;
	*) echo "build-scx: unknown argument $1" >&2; exit 2 ;;
	esac
done

log() { echo "build-scx: $*" >&2; }
die() { echo "build-scx: error: $*" >&2; exit 1; }

kernel_cache_root() {
	if [ -n "${KTSTR_CACHE_DIR:-}" ]; then echo "$KTSTR_CACHE_DIR"
	elif [ -n "${XDG_CACHE_HOME:-}" ]; then echo "$XDG_CACHE_HOME/ktstr/kernels"
	else echo "$HOME/.cache/ktstr/kernels"; fi
}

if [ -z "$VMLINUX_ARG" ]; then
	root=$(kernel_cache_root)
	# Newest cache entry that kept its vmlinux (entries starting with '.' are in-flight stores).
	VMLINUX_ARG=$(ls -1t "$root"/*/vmlinux 2>/dev/null | head -n1 || true)
	[ -n "$VMLINUX_ARG" ] || die "no vmlinux in the ktstr kernel cache $root; build a kernel first (cargo ktstr kernel build 6.12) or pass --vmlinux PATH"
fi
VMLINUX_PATH=$(readlink -f "$VMLINUX_ARG")
[ -f "$VMLINUX_PATH" ] || die "vmlinux $VMLINUX_ARG does not exist"
[ -f "$SRC_TARBALL" ] || die "kernel source tarball $SRC_TARBALL missing (apt-get install linux-source-6.12)"

for tool in "clang$CLANG_SUFFIX" "llvm-strip$CLANG_SUFFIX" make ld pkg-config; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install clang-16 llvm-16 libelf-dev zlib1g-dev make binutils pkg-config)"
done
pkg-config --exists libelf zlib 2>/dev/null || die "libelf/zlib development files missing (apt-get install libelf-dev zlib1g-dev)"

# The kernel cache key names the output when vmlinux lives in a cache entry;
# otherwise a hash of the vmlinux does.
entry_dir=$(dirname "$VMLINUX_PATH")
if [ -f "$entry_dir/metadata.json" ]; then
	key=$(basename "$entry_dir")
else
	key="vmlinux-$(sha256sum "$VMLINUX_PATH" | cut -c1-12)"
fi

OUT_ROOT=${KTSTR_SCX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ktstr/scx}
OUT="$OUT_ROOT/$key"
mkdir -p "$OUT_ROOT"

stamp_text() {
	echo "vmlinux $(sha256sum "$VMLINUX_PATH" | cut -d' ' -f1)"
	echo "source $(basename "$SRC_TARBALL") $(stat -c '%s %Y' "$SRC_TARBALL")"
	echo "script $(sha256sum "$0" | cut -d' ' -f1)"
	echo "clang $("clang$CLANG_SUFFIX" --version | head -n1)"
}

# One builder per key at a time; a second caller waits, then finds the stamp.
exec 9>"$OUT_ROOT/.$key.lock"
flock 9

want=$(stamp_text)
if [ "$FORCE" = 0 ] && [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$want" ]; then
	ok=1
	for s in "${SCHEDS[@]}"; do [ -x "$OUT/bin/$s" ] || ok=0; done
	if [ "$ok" = 1 ]; then
		log "up to date: $OUT/bin (vmlinux $VMLINUX_PATH)"
		echo "$OUT/bin"
		exit 0
	fi
fi

WORK=$(mktemp -d "$OUT_ROOT/.$key.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "building ${SCHEDS[*]} for $key (vmlinux $VMLINUX_PATH) in $WORK"

top=$(tar -tJf "$SRC_TARBALL" 2>/dev/null | head -n1 | cut -d/ -f1 || true)
[ -n "$top" ] || die "cannot read $SRC_TARBALL"
# tools/sched_ext needs tools/ (libbpf, bpftool, headers), the top-level
# include/ and Makefile, and kernel/bpf (bpftool's disassembler).
t0=$(date +%s)
tar -xJf "$SRC_TARBALL" -C "$WORK" \
	"$top/tools" "$top/include" "$top/scripts" "$top/arch/x86/include" \
	"$top/kernel/bpf" "$top/Makefile"
log "extracted $top in $(( $(date +%s) - t0 ))s"

mkdir -p "$WORK/o"
# LLVM=-16 picks clang-16/llvm-*-16; Debian ships no ld.lld-16 by default,
# so GNU ld links libbpf/bpftool objects. libbpf is linked statically.
t0=$(date +%s)
if ! make -C "$WORK/$top/tools/sched_ext" -j"$JOBS" \
	O="$WORK/o" LLVM="$CLANG_SUFFIX" LD=ld HOSTLD=ld \
	VMLINUX_BTF="$VMLINUX_PATH" "${SCHEDS[@]}" >"$WORK/build.log" 2>&1; then
	tail -n 40 "$WORK/build.log" >&2
	die "make failed (full log above was $WORK/build.log)"
fi
log "built in $(( $(date +%s) - t0 ))s"

mkdir -p "$WORK/result/bin"
for s in "${SCHEDS[@]}"; do
	cp "$WORK/o/build/bin/$s" "$WORK/result/bin/$s"
	# Cannot run them here (they open their BPF skeleton before parsing -h and
	# the host kernel has no sched_ext); check every shared library resolves.
	if ldd "$WORK/result/bin/$s" | grep -q 'not found'; then
		ldd "$WORK/result/bin/$s" >&2
		die "$s has unresolved shared libraries"
	fi
done
cp "$WORK/build.log" "$WORK/result/build.log"
echo "$want" >"$WORK/result/stamp"
echo "$VMLINUX_PATH" >"$WORK/result/vmlinux-path"

rm -rf "$OUT"
mv "$WORK/result" "$OUT"
log "cached in $OUT/bin"
echo "$OUT/bin"
