#!/usr/bin/env bash
# Nested-KVM rig: proves ktstr's KVM backend on real kernels on machines
# whose own /dev/kvm cannot run them. QEMU TCG emulates AMD SVM with nested
# paging (`-cpu max`), so a TCG guest running Debian's cloud kernel with
# kvm-amd loaded has a working /dev/kvm; inside it this rig runs ktstr test
# binaries as the host side with KTSTR_VMM=kvm and reports every verdict.
#
# Slow by nature (every outer instruction is emulated): a proof rig, not a
# backend. Usage:
#   scripts/nested-kvm.sh --bin NAME=PATH... --kernel LABEL=IMAGE... \
#       [--cpus N,N...] [--pin PATH] [--sched-dir DIR[:DIR...]] [--smp N|match] [--mem MIB] \
#       [--tcg single|multi] [--outer-kernel IMAGE --outer-modules DIR] \
#       [--timeout S] [--log FILE] [--boot-only] [--show-console] \
#       [--run LABEL=CMD...] [NAME:TEST...]
# Each NAME:TEST (e.g. `examples:spinners_all_make_progress`) runs once per
# --kernel, and with --cpus once per vCPU count (KTSTR_CPUS=N: the test's
# topology resized to N vCPUs). Outer vCPUs: one by default (thread=single:
# no TCG translation race anywhere), --smp N for N, --smp match for one
# outer boot per --cpus count N with N outer vCPUs (fairer CPU-time
# accounting, but exposed to multi-threaded TCG's stale translations of
# re-patched kernel text). Several outer vCPUs need --pin (the
# nested-kvm-pin binary) and run thread=multi; see docs/vmm.md. Prints one
# line per run,
#   nested-kvm: RESULT <PASS|FAIL|SKIP> kernel=LABEL test=NAME:TEST cpus=N|- rc=N secs=S init=S|- total=S|- host_wait=P%|-
# (init/total: the test's timing line; cpus=-: its own count; host_wait:
# how much of the run the outer vCPU threads waited for a host CPU) then a
# summary. Each --run LABEL=CMD runs CMD with `sh` in the first outer guest
# (KTSTR_VMM=kvm; --bin binaries at /t/NAME, kernels at /k/LABEL/bzImage,
# stdin /dev/null unless CMD pipes into it), prints its output as
# `nested-kvm: out| ` lines and one `RESULT ... run=LABEL rc=N` line (PASS
# for rc 0). The rig exits with the number of failed or missing runs (capped at
# 100), 101 if an outer guest never became ready, 102 for bad arguments,
# 103 if an outer kernel oopsed (its verdicts are then no evidence).
# NESTED_KVM_BOOT_CPUS=all boots several outer vCPUs all at once instead of
# maxcpus=1 (only to reproduce the outer oops described in docs/vmm.md).
set -euo pipefail

die() { echo "nested-kvm: $*" >&2; exit 102; }
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/ktstr
DEB_ROOT=$CACHE/debian/x
OUTER_KERNEL=
OUTER_MODULES=
SMP=${NESTED_KVM_SMP:-}
MEM=4096
TCG=${NESTED_KVM_TCG:-}
CPUS=
TIMEOUT=3600
LOG=
BOOT_ONLY=0
SHOW_CONSOLE=
SCHED_DIR=${KTSTR_SCHEDULER_DIR:-}
PIN=
declare -a BINS=() KERNELS=() TESTS=() FILES=() RUNS=()

while [ $# -gt 0 ]; do
	case $1 in
	--bin) BINS+=("$2"); shift 2 ;;
	--kernel) KERNELS+=("$2"); shift 2 ;;
	--sched-dir) SCHED_DIR=$2; shift 2 ;;
	--file) FILES+=("$2"); shift 2 ;;
	--smp) SMP=$2; shift 2 ;;
	--mem) MEM=$2; shift 2 ;;
	--tcg) TCG=$2; shift 2 ;;
	--outer-kernel) OUTER_KERNEL=$2; shift 2 ;;
	--outer-modules) OUTER_MODULES=$2; shift 2 ;;
	--timeout) TIMEOUT=$2; shift 2 ;;
	--log) LOG=$2; shift 2 ;;
	--boot-only) BOOT_ONLY=1; shift ;;
	--show-console) SHOW_CONSOLE=1; shift ;;
	--run) RUNS+=("$2"); shift 2 ;;
	--pin) PIN=$2; shift 2 ;;
	--cpus) CPUS=$2; shift 2 ;;
	-h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
	-*) die "unknown option $1 (see --help)" ;;
	*) TESTS+=("$1"); shift ;;
	esac
done

# The Debian cloud kernel that scripts/setup.sh extracts is the outer kernel;
# its own kvm modules must match it exactly.
if [ -z "$OUTER_KERNEL" ]; then
	OUTER_KERNEL=$(ls -1 "$DEB_ROOT"/boot/vmlinuz-6.12.*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
	[ -n "$OUTER_KERNEL" ] || die "no Debian cloud kernel under $DEB_ROOT/boot: run scripts/setup.sh or pass --outer-kernel"
fi
if [ -z "$OUTER_MODULES" ]; then
	OUTER_MODULES=$DEB_ROOT/lib/modules/${OUTER_KERNEL##*/vmlinuz-}
fi
[ -f "$OUTER_KERNEL" ] || die "--outer-kernel $OUTER_KERNEL is not a file"
[ -d "$OUTER_MODULES" ] || die "--outer-modules $OUTER_MODULES is not a directory (the modules of $OUTER_KERNEL)"
# Boot plan: "SMP:CPU,CPU..." per outer boot.
CPUS=${CPUS//,/ }
for n in $CPUS; do [[ $n =~ ^[1-9][0-9]*$ ]] || die "--cpus: $n is not a vCPU count (want e.g. 1,2,4)"; done
[[ -z $SMP || $SMP = match || $SMP =~ ^[1-9][0-9]*$ ]] || die "--smp $SMP: want a vCPU count or match"
declare -a BOOTS=()
if [ "$SMP" = match ] && [ -n "$CPUS" ]; then
	for n in $CPUS; do BOOTS+=("$n:$n"); done
else
	[ "$SMP" != match ] || SMP=
	c=${CPUS:--}; BOOTS=("${SMP:-1}:${c// /,}")
fi
MAXSMP=1
for b in "${BOOTS[@]}"; do [ "${b%%:*}" -le "$MAXSMP" ] || MAXSMP=${b%%:*}; done
# One outer vCPU runs thread=single; several need thread=multi (single
# deadlocks SMP inner guests: docs/vmm.md).
[ -n "$TCG" ] || { TCG=single; [ "$MAXSMP" = 1 ] || TCG=multi; }
case $TCG in single|multi) ;; *) die "--tcg $TCG: use single or multi" ;; esac
[ "$BOOT_ONLY" = 1 ] || [ ${#TESTS[@]} -gt 0 ] || [ ${#RUNS[@]} -gt 0 ] || die "no tests given (NAME:TEST, e.g. examples:guest_gets_cmdline_and_files)"
[ "$BOOT_ONLY" = 1 ] || [ ${#TESTS[@]} = 0 ] || [ ${#KERNELS[@]} -gt 0 ] || die "no --kernel LABEL=IMAGE given"
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || die "busybox not found: apt-get install busybox-static"
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' || die "$BUSYBOX is not static: apt-get install busybox-static"
command -v cpio >/dev/null || die "cpio not found: apt-get install cpio"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nested-kvm.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,proc,sys,dev,tmp,t,k,mod,scx,etc}

# copy_with_libs SRC DEST: a binary and every shared library it loads, at
# their own paths (the test binary packs them again for the inner guest).
copy_with_libs() {
	mkdir -p "$(dirname "$ROOT$2")"
	cp -L "$1" "$ROOT$2"
	local lib
	for lib in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*' || true); do
		[ -e "$ROOT$lib" ] && continue
		mkdir -p "$ROOT$(dirname "$lib")"
		cp -L "$lib" "$ROOT$lib"
	done
}

cp "$BUSYBOX" "$ROOT/bin/busybox"
if [ "$MAXSMP" -gt 1 ]; then
	[ -n "$PIN" ] && [ -x "$PIN" ] || die "$MAXSMP outer vCPUs need --pin PATH (the nested-kvm-pin binary: cargo build -p ktstr-tests --bins)"
	copy_with_libs "$PIN" /pin
fi
for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
	src=$OUTER_MODULES/kernel/$m.ko.xz
	[ -f "$src" ] || die "module $src missing (is $OUTER_MODULES a Debian cloud kernel's module tree?)"
	xz -dc "$src" >"$ROOT/mod/$(basename "$m").ko"
done

declare -A BIN_OF=()
for b in "${BINS[@]}"; do
	name=${b%%=*} path=${b#*=}
	[ "$name" != "$b" ] && [ -x "$path" ] || die "--bin $b: want NAME=PATH to an executable test binary"
	copy_with_libs "$path" "/t/$name"
	# The outer guest has no objcopy: the runtime there would pack the
	# binary with its DWARF (~75 MiB), too big for a 256 MiB inner guest.
	objcopy --strip-debug "$ROOT/t/$name" || die "objcopy --strip-debug $path failed (install binutils)"
	BIN_OF[$name]=1
done
KLIST=
for k in "${KERNELS[@]}"; do
	label=${k%%=*} img=${k#*=}
	[ "$label" != "$k" ] && [ -f "$img" ] || die "--kernel $k: want LABEL=IMAGE to a bootable kernel image"
	mkdir -p "$ROOT/k/$label" && cp "$img" "$ROOT/k/$label/bzImage"
	KLIST+="$label "
done
# A `:`-separated list, like KTSTR_SCHEDULER_DIR; the first directory
# holding a name wins, as in the runtime's lookup.
IFS=: read -ra SCHED_DIRS <<<"$SCHED_DIR"
for d in "${SCHED_DIRS[@]}"; do
	[ -d "$d" ] || die "--sched-dir $d is not a directory"
	for s in "$d"/*; do
		[ -x "$s" ] && [ ! -e "$ROOT/scx/$(basename "$s")" ] && copy_with_libs "$s" "/scx/$(basename "$s")"
	done
done
# Binaries the demo schedulers name by absolute path.
for b in /usr/bin/false /usr/bin/sleep; do copy_with_libs "$b" "$b"; done
for f in "${FILES[@]}"; do
	[ -f "$f" ] || die "--file $f is not a file"
	mkdir -p "$ROOT$(dirname "$f")" && cp "$f" "$ROOT$f"
done
TLIST=
for t in "${TESTS[@]}"; do
	name=${t%%:*} test=${t#*:}
	[ "$name" != "$t" ] && [ -n "${BIN_OF[$name]:-}" ] || die "test $t: want NAME:TEST with NAME given by --bin NAME=PATH"
	TLIST+="$t "
done

mkdir -p "$ROOT/runs"
for r in "${RUNS[@]}"; do
	label=${r%%=*} cmd=${r#*=}
	[ "$label" != "$r" ] && [[ $label =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run $r: want LABEL=CMD with LABEL of letters, digits, . _ -"
	printf '%s\n' "$cmd" >"$ROOT/runs/$label.sh"
done

# The outer /init: mount, load kvm-amd, run every test on every kernel.
cat >"$ROOT/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin HOME=/tmp TMPDIR=/tmp SHOW_CONSOLE=$SHOW_CONSOLE
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/shm; mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /dev/shm
for m in irqbypass kvm kvm-amd; do insmod /mod/\$m.ko || echo "nested-kvm: insmod \$m failed"; done
# Several outer vCPUs: the kernel booted with only its boot CPU (maxcpus=1),
# so boot-time text patching raced no other vCPU. Pin KVM's static keys on
# while that is still so, then bring the other CPUs up (docs/vmm.md).
if [ -x /pin ]; then
	/pin >/tmp/pin.out 2>&1 &
	i=0; until grep -q holding /tmp/pin.out || [ \$i -ge 300 ]; do sleep 0.1; i=\$((i + 1)); done
	grep -q holding /tmp/pin.out || { echo "nested-kvm: NO-PIN \$(cat /tmp/pin.out)"; poweroff -f; }
	# A spinner keeps the boot CPU ticking: a new CPU calibrates against
	# jiffies, which stall while the boot CPU idles tickless (docs/vmm.md).
	( while :; do :; done ) & sp=\$!
	for c in /sys/devices/system/cpu/cpu[0-9]*; do
		[ "\$(cat \$c/online 2>/dev/null)" = 0 ] && { echo 1 >\$c/online || echo "nested-kvm: onlining \$c failed"; }
	done
	kill \$sp
fi
# Several outer vCPUs run thread=multi, whose stale translations of
# re-patched text reach the inner kernels too: they boot with maxcpus=1 and
# ktstr's init brings their CPUs up (docs/vmm.md).
[ "\$(nproc)" -gt 1 ] && export KTSTR_KVM_BOOT_CPUS=one
cs=\$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)
if [ -c /dev/kvm ]; then echo "nested-kvm: READY uptime=\$(cut -d' ' -f1 /proc/uptime) cpus=\$(nproc) clocksource=\$cs"
else echo "nested-kvm: NO-KVM (svm: \$(grep -c svm /proc/cpuinfo))"; poweroff -f; fi
# This boot's vCPU counts ("-": each test's own) come on the command line.
cpus=\$(sed -n 's/.*nested_kvm.cpus=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
for n in \${cpus:--}; do
	if [ "\$n" = - ]; then unset KTSTR_CPUS; else export KTSTR_CPUS=\$n; fi
	for t in $TLIST; do
		bin=\${t%%:*}; name=\${t#*:}
		for k in $KLIST; do
			echo "nested-kvm: BEGIN kernel=\$k test=\$t cpus=\$n"
			s=\$(cut -d' ' -f1 /proc/uptime)
			NEXTEST=1 KTSTR_VMM=kvm KTSTR_TEST_KERNEL=/k/\$k/bzImage KTSTR_SCHEDULER_DIR=/scx KTSTR_ARTIFACT_DIR=/tmp/art \\
				/t/\$bin --exact ktstr/\$name >/tmp/out 2>&1
			rc=\$?
			e=\$(cut -d' ' -f1 /proc/uptime)
			sed 's/^/  | /' /tmp/out
			# A failure's whole guest console (the verdict shows only its tail).
			[ \$rc = 0 ] || [ -z "\$SHOW_CONSOLE" ] || [ ! -d /tmp/art ] || find /tmp/art -name console.log -exec sed 's/^/  console| /' {} +
			rm -rf /tmp/art
			v=FAIL; [ \$rc = 0 ] && v=PASS; [ \$rc = 0 ] && grep -q 'ktstr: SKIP' /tmp/out && v=SKIP
			# The timing line: "init after 1.77s, body after -, total 2.13s".
			tl=\$(grep -oE 'init after [^,]*, (body after [^,]*, )?total [0-9.]*s' /tmp/out | tail -n1)
			init=\$(echo "\$tl" | sed -n 's/init after \([0-9.]*\)s,.*/\1/p')
			total=\$(echo "\$tl" | sed -n 's/.*, total \([0-9.]*\)s/\1/p')
			echo "nested-kvm: RESULT \$v kernel=\$k test=\$t cpus=\$n rc=\$rc secs=\$(awk "BEGIN{print \$e-\$s}") init=\${init:--} total=\${total:--}"
		done
	done
done
unset KTSTR_CPUS
if grep -q nested_kvm.runs=1 /proc/cmdline; then
	for r in /runs/*.sh; do
		[ -f "\$r" ] || continue
		label=\$(basename "\$r" .sh)
		echo "nested-kvm: BEGIN run=\$label"
		s=\$(cut -d' ' -f1 /proc/uptime)
		KTSTR_VMM=kvm sh "\$r" </dev/null >/tmp/out 2>&1
		rc=\$?
		e=\$(cut -d' ' -f1 /proc/uptime)
		sed 's/^/nested-kvm: out| /' /tmp/out
		v=FAIL; [ \$rc = 0 ] && v=PASS
		echo "nested-kvm: RESULT \$v run=\$label rc=\$rc secs=\$(awk "BEGIN{print \$e-\$s}")"
	done
fi
echo "nested-kvm: DONE"
# The host reads the outer vCPUs' wait for the last RESULT while QEMU runs.
sleep 1
poweroff -f
EOF
chmod +x "$ROOT/init"
(cd "$ROOT" && find . | cpio -o -H newc --quiet) >"$WORK/outer.cpio"
echo "nested-kvm: outer initramfs $(du -m "$WORK/outer.cpio" | cut -f1) MiB; outer kernel $OUTER_KERNEL; -m $MEM, tcg thread=$TCG, ${#BOOTS[@]} outer boot(s)" >&2

# A log of its own by default: several rigs may run at once.
LOG=${LOG:-$(mktemp "${TMPDIR:-/tmp}/nested-kvm.XXXXXX.log")}
: >"$LOG"
T0=$EPOCHREALTIME
fails=0 results=0 outer_oops=0 unready=0 boot_times=
# Host run-queue wait of the outer vCPU threads, in ns (TCG gives the
# outer guest no steal time, so this is the only trace of host contention).
vcpu_wait() {
	local pid t
	pid=$(cat "$WORK/qemu.pid" 2>/dev/null) && [ -d /proc/"$pid" ] || { echo -; return; }
	for t in /proc/"$pid"/task/*; do
		# thread=multi names them "CPU N/TCG", thread=single "ALL CPUs/TCG".
		case $(cat "$t/comm" 2>/dev/null) in "CPU "*|"ALL CPUs"*) cut -d' ' -f2 "$t/schedstat" 2>/dev/null ;; esac
	done | awk '{s += $1} END {printf "%.0f", s}'
}
# One outer boot: SMP vCPUs, running every test at the vCPU counts CPUS
# (comma list or "-"); RUNS=1 also runs the --run commands.
# -cpu max: TCG's AMD SVM + NPT. Several outer vCPUs boot with maxcpus=1
# and come up in init after nested-kvm-pin holds KVM's static keys
# (docs/vmm.md); tsc=reliable keeps the outer kernel from flipping
# sched_clock's static key at run time.
boot_outer() {
	local smp=$1 cpus=$2 runs=$3 t0=$EPOCHREALTIME ready= line extra= w0=- w1= s0=$EPOCHREALTIME
	# NESTED_KVM_BOOT_CPUS=all boots every outer CPU at once (reproduces the
	# outer int3 oops in docs/vmm.md).
	[ "$smp" = 1 ] || [ "${NESTED_KVM_BOOT_CPUS:-}" = all ] || extra=" maxcpus=1"
	# Host threads running the outer vCPUs: one for all under thread=single.
	local threads=$smp
	[ "$TCG" = multi ] || threads=1
	echo "nested-kvm: outer boot: -smp $smp, tcg thread=$TCG, vCPU counts $cpus" >&2
	while IFS= read -r line; do
		line=${line%$'\r'}
		# RESULT lines are logged once host_wait is added.
		[[ $line == "nested-kvm: RESULT"* ]] || printf '%s\n' "$line" >>"$LOG"
		case $line in
		"nested-kvm: READY"*)
			ready=$(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME-$t0}")
			echo "$line (outer boot ${ready}s wall)" ;;
		"nested-kvm: BEGIN"*)
			echo "$line"; w0=$(vcpu_wait); s0=$EPOCHREALTIME ;;
		"nested-kvm: RESULT"*)
			# The share of the run its outer vCPUs spent waiting for a host CPU.
			w1=$(vcpu_wait)
			if [ "$w0" = - ] || [ "$w1" = - ]; then line+=" host_wait=-"
			else line+=" host_wait=$(awk "BEGIN{printf \"%.0f\", 100 * ($w1 - $w0) / 1e9 / (($EPOCHREALTIME - $s0) * $threads)}")%"; fi
			printf '%s\n' "$line" >>"$LOG"
			echo "$line"; results=$((results + 1))
			case $line in *" FAIL "*) fails=$((fails + 1)) ;; esac ;;
		"["*"Oops"*|"["*"BUG:"*|"["*"Kernel panic"*)
			# The outer kernel itself broke: every verdict after this is suspect.
			echo "$line"; outer_oops=$((outer_oops + 1)) ;;
		"nested-kvm: "*|*"ktstr: "*|*"Unhandled"*|*"Kernel panic"*|"  console| "*) echo "$line" ;;
		esac
	done < <(timeout "$TIMEOUT" qemu-system-x86_64 -nodefaults -no-user-config -display none -machine pc \
		-name nested-kvm,debug-threads=on -pidfile "$WORK/qemu.pid" \
		-accel tcg,thread="$TCG" -cpu max -smp "$smp" -m "$MEM" -no-reboot -serial stdio \
		-kernel "$OUTER_KERNEL" -initrd "$WORK/outer.cpio" \
		-append "console=ttyS0 panic=-1 loglevel=4 tsc=reliable$extra nested_kvm.cpus=$cpus nested_kvm.runs=$runs" </dev/null 2>&1)
	[ -n "$ready" ] || unready=$((unready + 1))
	boot_times+="${boot_times:+,}${ready:--}"
}
runs=1
for b in "${BOOTS[@]}"; do
	boot_outer "${b%%:*}" "${b#*:}" "$runs"
	runs=0
done
total=$(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME-$T0}")
ncpus=$(wc -w <<<"${CPUS:--}")
expected=$(( $(wc -w <<<"$TLIST") * $(wc -w <<<"$KLIST") * ncpus + ${#RUNS[@]} ))
echo "nested-kvm: SUMMARY results=$results/$expected failed=$fails outer_boots=${#BOOTS[@]} outer_boot=${boot_times}s total=${total}s outer_oops=$outer_oops log=$LOG"
[ "$unready" = 0 ] || exit 101
[ "$outer_oops" = 0 ] || { echo "nested-kvm: the outer kernel oopsed or panicked: verdicts are not evidence"; exit 103; }
missing=$((expected - results))
n=$((fails + missing))
exit $((n > 100 ? 100 : n))
