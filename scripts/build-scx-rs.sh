#!/usr/bin/env bash
# Builds the scx project's schedulers (crates.io: scx_bpfland, scx_rusty) at
# pinned versions with `cargo install --locked`, and caches them.
#
# Usage: scripts/build-scx-rs.sh [--force]
#   output: $KTSTR_SCX_RS_CACHE_DIR (default ~/.cache/ktstr/scx-rs)/<name>-<version>/bin/<name>,
#           and <cache>/bin/<name> symlinks to the pinned versions.
#           The last line on stdout is that bin directory (for KTSTR_SCHEDULER_DIR).
#   clang:  their BPF code needs clang >= 18 (scx_cargo refuses older);
#           $BPF_CLANG (default clang-19, Debian 12's `clang-19` package).
#   jobs:   $JOBS (default 1: the build is long and the machine is shared).
# Idempotent: an installed binary plus a stamp (version + clang) skips it.
# Unlike build-scx.sh nothing is per kernel: the scx schedulers are CO-RE
# and carry their own vmlinux.h, so one build runs on any sched_ext kernel.
set -euo pipefail

# name=version. Newest releases as of 2026-12 whose MSRV (1.91) fits the
# toolchain and which build with clang-19.
PINS=(scx_bpfland=1.1.4 scx_rusty=1.1.4)
BPF_CLANG=${BPF_CLANG:-clang-19}
JOBS=${JOBS:-1}
FORCE=0

while [ $# -gt 0 ]; do
	case "$1" in
	--force) FORCE=1; shift ;;
	-h|--help) sed -n '2,14p' "$0"; exit 0 ;;
	*) echo "build-scx-rs: unknown argument $1" >&2; exit 2 ;;
	esac
done

log() { echo "build-scx-rs: $*" >&2; }
die() { echo "build-scx-rs: error: $*" >&2; exit 1; }

command -v "$BPF_CLANG" >/dev/null || die "$BPF_CLANG not found (apt-get install clang-19, or set BPF_CLANG to a clang >= 18)"
command -v cargo >/dev/null || die "cargo not found (install Rust >= 1.91)"
for tool in pkg-config make; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install $tool)"
done
pkg-config --exists libelf zlib 2>/dev/null || die "libelf/zlib development files missing (apt-get install libelf-dev zlib1g-dev)"

OUT_ROOT=${KTSTR_SCX_RS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ktstr/scx-rs}
mkdir -p "$OUT_ROOT/bin"
exec 9>"$OUT_ROOT/.lock"
flock 9

clang_line=$("$BPF_CLANG" --version | head -n1)
# One target dir for all pins: they share most dependencies (scx_utils,
# libbpf-rs, libbpf-sys), so the second build reuses the first's.
TARGET_DIR="$OUT_ROOT/.target"

for pin in "${PINS[@]}"; do
	name=${pin%%=*}
	ver=${pin#*=}
	dir="$OUT_ROOT/$name-$ver"
	want="$name $ver; $clang_line"
	if [ "$FORCE" = 0 ] && [ -x "$dir/bin/$name" ] && [ "$(cat "$dir/stamp" 2>/dev/null)" = "$want" ]; then
		log "up to date: $dir/bin/$name"
	else
		log "building $name $ver with $clang_line (-j$JOBS; tens of minutes on 2 cores)"
		t0=$(date +%s)
		rm -rf "$dir.tmp"
		if ! BPF_CLANG="$BPF_CLANG" CARGO_TARGET_DIR="$TARGET_DIR" \
			cargo install --locked --quiet -j "$JOBS" --version "=$ver" \
			--root "$dir.tmp" "$name" >"$OUT_ROOT/$name-$ver.log" 2>&1; then
			tail -n 40 "$OUT_ROOT/$name-$ver.log" >&2
			die "cargo install $name $ver failed (log: $OUT_ROOT/$name-$ver.log)"
		fi
		if ldd "$dir.tmp/bin/$name" | grep -q 'not found'; then
			ldd "$dir.tmp/bin/$name" >&2
			die "$name has unresolved shared libraries"
		fi
		echo "$want" >"$dir.tmp/stamp"
		mv "$OUT_ROOT/$name-$ver.log" "$dir.tmp/build.log"
		rm -rf "$dir"
		mv "$dir.tmp" "$dir"
		log "built $name $ver in $(( $(date +%s) - t0 ))s: $dir/bin/$name"
	fi
	ln -sfn "../$name-$ver/bin/$name" "$OUT_ROOT/bin/$name"
done
echo "$OUT_ROOT/bin"
