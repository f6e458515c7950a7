#!/usr/bin/env bash
# A small fleet of burstable VMs, started from a shell loop: three VMs of the project's test guest
# (every vCPU busy) with different baselines and balances. Shows `burst-qemu ls` and `credits`
# while they burst, decline and settle at their baselines, then stops them cleanly.
#
# Needs root (cgroups) and Rust; installs QEMU with apt when it is missing, as .ci/run does.
# Takes about a minute.
#   bash examples/fleet.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-system-x86_64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing QEMU (qemu-system-x86)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            qemu-system-x86 >/dev/null
    else
        echo "fleet.sh: qemu-system-x86_64 is missing: install qemu-system-x86 (as root: apt-get install qemu-system-x86)" >&2
        exit 1
    fi
fi

cargo build --release --quiet
BQ=$PWD/target/release/burst-qemu
work=$(mktemp -d /tmp/burst-fleet.XXXXXX)
export BURST_QEMU_STATE_DIR=$work/state BURST_QEMU_VMS=$work/vms BURST_QEMU_DATA_DIR=$work/data
mkdir -p "$BURST_QEMU_VMS"
"$BQ" test-guest "$work/busy.bin"

cleanup() {
    for vm in web db batch; do "$BQ" stop "$vm" --wait 15 2>/dev/null || true; done
    wait
    # The agent saves each ledger as its VM ends; stop it before removing its files.
    agent=$(cat "$BURST_QEMU_STATE_DIR/agent.lock" 2>/dev/null || true)
    if [ -n "$agent" ] && kill "$agent" 2>/dev/null; then
        while kill -0 "$agent" 2>/dev/null; do sleep 0.1; done
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# name, baseline (% per vCPU), launch credits, decline minutes
fleet="web 20 2 0.25
db 10 0.5 0.25
batch 5 0 0.25"

echo "== starting three 2-vCPU VMs from a shell loop"
while read -r name baseline credits decline; do
    # The config file is the VM's source of truth; write it before the first launch so it
    # carries a short decline for the demo (the default is 20 minutes).
    printf 'vcpus = 2\nbaseline = %s\ninitial_credits = %s\ndecline_minutes = %s\n' \
        "$baseline" "$credits" "$decline" > "$BURST_QEMU_VMS/$name.toml"
    "$BQ" --name "$name" --shutdown-timeout 2 -- \
        qemu-system-x86_64 -machine pc -nodefaults -display none -m 16 \
        -accel tcg,thread=multi -bios "$work/busy.bin" &
done <<< "$fleet"

for vm in web db batch; do
    until "$BQ" credits "$vm" >/dev/null 2>&1; do sleep 0.2; done
done

for round in 1 2 3 4 5 6; do
    echo
    echo "== after $(( (round - 1) * 8 )) s"
    "$BQ" ls
    for vm in web db batch; do
        # The agent's one-value files in the VM's runtime dir, refreshed every tick.
        d=$BURST_QEMU_STATE_DIR/$vm
        printf '%-6s balance %8s  usage %6s %%  grant %6s %%  earn %s/h\n' "$vm" \
            "$(cat "$d/balance")" "$(cat "$d/usage_pct")" "$(cat "$d/grant_pct")" "$(cat "$d/earn_per_hour")"
    done
    sleep 8
done

echo
echo "== raising db's baseline to 40 % by editing its config while it runs"
sed -i 's/^baseline = 10/baseline = 40/' "$BURST_QEMU_VMS/db.toml"
sleep 1
"$BQ" credits db
echo
echo "== giving batch 5 credits"
"$BQ" credits batch --set 5
echo
echo "== stopping the fleet"
