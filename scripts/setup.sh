#!/usr/bin/env bash
# Sourced by .ci/run and scripts/quickstart.sh: installs what ktstr needs on
# Debian (packages, cargo-nextest, busybox-static for scripts/nested-kvm.sh),
# fetches the Debian 6.12 cloud kernel, builds the ktstr 6.12 kernel and the
# sched_ext example schedulers and the scx project's scx_bpfland and
# scx_rusty, all cached under ~/.cache/ktstr (a second run reuses
# everything), and the moto S3 server for the remote-cache tests. Exports
# DEB_KERNEL, KTSTR_KERNEL_DIR, SCX_BIN, SCX_RS_BIN and KTSTR_MOTO_SERVER
# for the caller.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/ktstr

# Phases: `step NAME` starts one (and ends the previous one, printing its
# duration); `step_done` ends the last; `phase_summary` prints them all.
PHASES=()
STEP_NAME=
STEP_T0=0
step_done() {
	[ -n "$STEP_NAME" ] || return 0
	local took=$((SECONDS - STEP_T0))
	printf '=== %s took %dm%02ds\n' "$STEP_NAME" $((took / 60)) $((took % 60))
	PHASES+=("$(printf '%-20s %4dm%02ds' "$STEP_NAME" $((took / 60)) $((took % 60)))")
	STEP_NAME=
}
step() {
	step_done
	STEP_NAME="$*"
	STEP_T0=$SECONDS
	printf '\n=== %s (%s)\n' "$*" "$(date +%T)"
}
phase_summary() {
	step_done
	echo "=== phase times"
	printf '  %s\n' "${PHASES[@]}"
}

# --- Debian packages: kernel build deps, QEMU, BPF toolchain -------------
# bpftool, bsdutils (script), dash (sh) and coreutils (tty) also run inside
# the guest: tests/tests/host_tools.rs packs them with `host_tools`.
# busybox-static is `cargo ktstr shell`'s userland; tmux drives its
# interactive test (cargo-ktstr/tests/shell.rs).
# acpica-tools: iasl disassembles the KVM backend's ACPI tables in a test.
# binutils: objcopy strips DWARF from binaries packed into a guest initramfs.
# clang-19: the scx project's schedulers need clang >= 18 for their BPF
# (scripts/build-scx-rs.sh); the kernel's examples build with clang-16.
# python3-venv: the moto venv below.
step "packages"
PKGS=(linux-source-6.12 qemu-system-x86 flex bison bc libelf-dev libssl-dev
      dwarves cpio ccache clang-16 llvm-16 clang-19 bpftool lz4 zstd xz-utils
      pkg-config zlib1g-dev make gcc libc6-dev git util-linux bsdutils dash coreutils
      busybox-static tmux acpica-tools binutils python3-venv)
missing=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq
	$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked

# --- moto: the S3-compatible server the remote-cache tests start on 127.0.0.1
step "moto"
# A venv of our own (Debian's Python refuses system-wide pip installs);
# an existing moto_server on PATH is used as is.
if command -v moto_server >/dev/null; then
	KTSTR_MOTO_SERVER=$(command -v moto_server)
else
	MOTO_VENV=$CACHE/moto-venv
	# Made in place (a venv does not survive a move); the stamp marks it complete.
	if [ ! -e "$MOTO_VENV/.ktstr-complete" ]; then
		rm -rf "$MOTO_VENV" && python3 -m venv "$MOTO_VENV"
		"$MOTO_VENV/bin/pip" install -q 'moto[server]==5.2.5'  # pinned: the version the tests were proven with
		touch "$MOTO_VENV/.ktstr-complete"
	fi
	KTSTR_MOTO_SERVER=$MOTO_VENV/bin/moto_server
fi
echo "moto: $KTSTR_MOTO_SERVER"

# --- The Debian 6.12 cloud kernel (prebuilt, no sched_ext) ----------------
step "debian cloud kernel"
DEB_DIR=$CACHE/debian
DEB_KERNEL=$(ls -1 "$DEB_DIR"/x/boot/vmlinuz-6.12.*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$DEB_KERNEL" ]; then
	mkdir -p "$DEB_DIR" && rm -rf "$DEB_DIR/dl" && mkdir "$DEB_DIR/dl"
	pkg=$(apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -n1)
	(cd "$DEB_DIR/dl" && apt-get download "$pkg")
	rm -rf "$DEB_DIR/x.tmp" && dpkg-deb -x "$DEB_DIR"/dl/*.deb "$DEB_DIR/x.tmp"
	rm -rf "$DEB_DIR/x" && mv "$DEB_DIR/x.tmp" "$DEB_DIR/x" && rm -rf "$DEB_DIR/dl"
	DEB_KERNEL=$(ls -1 "$DEB_DIR"/x/boot/vmlinuz-6.12.*-cloud-amd64 | sort -V | tail -n1)
fi
echo "debian kernel: $DEB_KERNEL"

# --- Workspace build -------------------------------------------------------
step "cargo build"
cargo build --workspace --all-targets

# --- The ktstr 6.12 kernel (cache hit after the first run on a machine) ----
step "ktstr kernel"
# Prints `label=image` on stdout; a cache hit after the first run.
KTSTR_IMAGE=$(./target/debug/cargo-ktstr ktstr kernel build /usr/src/linux-source-6.12.tar.xz | tail -n1 | cut -d= -f2-)
KTSTR_KERNEL_DIR=$(dirname "$KTSTR_IMAGE")
echo "ktstr kernel: $KTSTR_KERNEL_DIR"

# --- sched_ext example schedulers, built against that kernel's BTF ---------
step "sched_ext fixtures"
SCX_BIN=$(scripts/build-scx.sh --vmlinux "$KTSTR_KERNEL_DIR/vmlinux" | tail -n1)
echo "schedulers: $SCX_BIN"

# --- The scx project's schedulers (crates.io, pinned; not per kernel) -----
step "scx project schedulers"
# Setup owns the machine: build with every core (the script defaults to 1).
SCX_RS_BIN=$(JOBS=${JOBS:-$(nproc)} scripts/build-scx-rs.sh | tail -n1)
echo "scx project schedulers: $SCX_RS_BIN"

step_done
export DEB_KERNEL KTSTR_KERNEL_DIR SCX_BIN SCX_RS_BIN KTSTR_MOTO_SERVER
