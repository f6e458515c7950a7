#!/usr/bin/env bash
# `ls` and `ls --json` wall time with N opted-in libvirt domains (TCG, the halted test firmware,
# 1 vCPU, 32 MiB each), median of 7 runs of each binary interleaved, plus how many connections
# to libvirtd one `ls` opens (strace). Compares two builds with the `libvirt` feature:
#   flock /work/.cpu.lock nice -n 0 bash examples/libvirt_ls.sh OLD_BIN NEW_BIN [N=40]
# Needs root and a running libvirtd (qemu:///system); its domains are named bq-lsbench-* and
# removed on exit. One domain is paused, so `ls` shows two states. Results: docs/scale.md.
set -u
OLD=$(realpath "$1") NEW=$(realpath "$2") N=${3:-40}
D=$(mktemp -d /tmp/bq-lsbench.XXXXXX)
IMG=/var/lib/libvirt/images/bq-lsbench.bin
mkdir -p "$D/state" "$D/data" "$D/vms"
export BURST_QEMU_DATA_DIR=$D/data
"$NEW" test-guest --halt "$IMG"
cleanup() {
    [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null
    for n in $(virsh list --all --name | grep '^bq-lsbench-'); do
        virsh -q destroy "$n" >/dev/null 2>&1
        virsh -q undefine "$n" >/dev/null 2>&1
    done
    rm -rf "$IMG" "$D"
}
trap cleanup EXIT
for i in $(seq 1 "$N"); do
    cat >"$D/dom.xml" <<XML
<domain type='qemu'><name>bq-lsbench-$i</name><memory unit='MiB'>32</memory>
<vcpu placement='static'>1</vcpu>
<metadata><bq:config xmlns:bq='urn:burst-qemu:config:1' baseline='20'/></metadata>
<os><type arch='x86_64' machine='pc'>hvm</type><loader type='rom'>$IMG</loader></os>
<on_crash>destroy</on_crash>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='virtio'/></devices>
</domain>
XML
    virsh -q define "$D/dom.xml" >/dev/null && virsh -q start "bq-lsbench-$i" >/dev/null ||
        echo "domain $i failed to start"
done
"$NEW" --vms "$D/vms" agent --libvirt qemu:///system --libvirt-domains 'bq-lsbench-*' \
    --state-dir "$D/state" 2>"$D/agent.log" &
AGENT=$!
for t in $(seq 1 120); do
    n=$("$NEW" --state-dir "$D/state" ls --json 2>/dev/null | grep -c '"name"')
    [ "$n" -ge "$N" ] && break
    sleep 1
done
echo "$n of $N domains in the fleet after ${t} s"
virsh -q suspend bq-lsbench-1 >/dev/null
sleep 3
python3 - "$D/state" "$OLD" "$NEW" <<'PY'
import json, statistics, subprocess, sys, time
state, bins = sys.argv[1], {"old": sys.argv[2], "new": sys.argv[3]}
times, rows = {}, {}
for _ in range(7):
    for b, path in bins.items():
        for args in (["ls"], ["ls", "--json"]):
            t = time.perf_counter()
            out = subprocess.run([path, "--state-dir", state, *args],
                                 capture_output=True, check=True).stdout
            times.setdefault((b, " ".join(args)), []).append(time.perf_counter() - t)
            if args == ["ls", "--json"]:
                rows[b] = sorted((r["name"], r["state"]) for r in json.loads(out))
for (b, a), xs in sorted(times.items()):
    print(f"{b} {a:10} median {statistics.median(xs) * 1000:6.1f} ms "
          f"(min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f})")
print("same states listed:", rows["old"] == rows["new"],
      "; states:", sorted({s for _, s in rows["new"]}))
PY
for b in "$OLD" "$NEW"; do
    c=$(strace -f -e trace=connect "$b" --state-dir "$D/state" ls 2>&1 >/dev/null |
        grep -c libvirt-sock)
    echo "$b: $c connection(s) to libvirtd in one ls"
done
