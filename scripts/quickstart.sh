#!/usr/bin/env bash
# The quick start: set up (packages, kernels, schedulers; cached), then run
# the example tests in VMs with `cargo ktstr test`, once per kernel: the
# ktstr-built 6.12 (sched_ext on) and the Debian 6.12 cloud image (sched_ext
# off, so scheduler tests SKIP there). Extra arguments go to nextest, e.g.
# `scripts/quickstart.sh -E 'test(/kernel_6_12_[0-9]+$/)'` for the ktstr
# kernel only (anchored: a bare test(kernel_6_12) is a substring match).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

step "cargo ktstr test"
export PATH="$PWD/target/debug:$PATH"
exec cargo ktstr test --kernel /usr/src/linux-source-6.12.tar.xz --kernel "$DEB_KERNEL" -p ktstr-tests -- "$@"
