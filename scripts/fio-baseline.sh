#!/usr/bin/env bash
# fio-baseline.sh: what the disk under Graviton's data directory can do, measured with
# fio and O_DIRECT, as the baseline that scripts/bench sets Graviton's figures against.
#
# Four jobs, one after another (stonewall), on one file system:
#   seq-write    1 MiB sequential writes of --size bytes, fsync at the end   (upload)
#   seq-read     1 MiB sequential reads of the file seq-write just wrote     (download)
#   rand-read    4 KiB random reads of that file at queue depth --qd         (small gets)
#   fsync-write  4 KiB writes at QD1, fsync after every one (--fsync=1),
#                overwriting the laid-out file: the flush-per-write baseline (durable puts)
# Every job uses direct=1, so no read is served from the page cache, and the read jobs
# read data that was actually written. The engine is io_uring, else libaio, else psync
# (with psync, rand-read runs --qd threads at QD1 instead).
#
# Usage: scripts/fio-baseline.sh [--dir DIR] [--out FILE] [--size BYTES] [--runtime S]
#                                [--qd N] [--seq-qd N] [--fsync-size BYTES] [--smoke] [--keep]
#   --dir DIR   a directory on the file system to measure (default: a new directory under
#               graviton-data/ in the repository, where Graviton's data lives; never tmpfs)
#   --out FILE  fio's JSON output (default: bench-results/fio-<UTC time>.json)
#   --size      the sequential file (default 4G); --fsync-size: bytes fsync-write may write (256M)
#   --runtime   seconds cap of rand-read and fsync-write (default 20)
#   --qd        rand-read queue depth (default 64, as the 64 concurrent gets);
#   --seq-qd    sequential queue depth (default 32: on the virtio disk here QD 8 left a
#               third of the write bandwidth and a quarter of the read bandwidth unused)
#   --smoke     tiny sizes and 1 s jobs: checks the script, measures nothing worth keeping
# Installs fio with apt-get if it is missing.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=""
out=""
size=4G
runtime=20
qd=64
seq_qd=32
fsync_size=256M
keep=0

while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --qd) qd=$2; shift 2 ;;
    --seq-qd) seq_qd=$2; shift 2 ;;
    --fsync-size) fsync_size=$2; shift 2 ;;
    --smoke) size=64M; runtime=1; fsync_size=4M; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fio-baseline: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "fio-baseline: $*" >&2; }

if ! command -v fio >/dev/null 2>&1; then
  say "fio is missing; installing it with apt-get"
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "cannot install fio (needs root and apt-get); install it and run again"; exit 1
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi

if [ -z "$dir" ]; then
  mkdir -p "$repo/graviton-data"
  dir=$(mktemp -d "$repo/graviton-data/fio-baseline.XXXXXX")
  made_dir=1
else
  mkdir -p "$dir"
  made_dir=0
fi
fs_type=$(stat -f -c %T "$dir")
case "$fs_type" in
  tmpfs|ramfs|overlayfs) say "$dir is on $fs_type, which is not a disk: choose --dir on the data disk"; exit 1 ;;
esac
device=$(df -P "$dir" | awk 'NR==2 {print $1}')

if [ -z "$out" ]; then
  mkdir -p "$repo/bench-results"
  out="$repo/bench-results/fio-$(date -u +%Y%m%dT%H%M%SZ).json"
fi
mkdir -p "$(dirname "$out")"

seq_file="$dir/fio-seq.dat"
cleanup() {
  if [ "$keep" -eq 0 ]; then
    rm -f "$seq_file" "$dir/fio-probe.dat" "$dir/fio-jobs.ini"
    [ "$made_dir" -eq 1 ] && rmdir "$dir" 2>/dev/null || true
  fi
}
trap cleanup EXIT

engine=""
for candidate in io_uring libaio psync; do
  if fio --name=probe --filename="$dir/fio-probe.dat" --size=1M --bs=4k --rw=write \
       --direct=1 --ioengine="$candidate" --output-format=terse >/dev/null 2>&1; then
    engine=$candidate; break
  fi
done
rm -f "$dir/fio-probe.dat"
[ -n "$engine" ] || { say "no fio engine could do O_DIRECT I/O in $dir"; exit 1; }

if [ "$engine" = psync ]; then
  rand_depth="iodepth=1
numjobs=$qd"
  seq_depth="iodepth=1"
else
  rand_depth="iodepth=$qd"
  seq_depth="iodepth=$seq_qd"
fi

cat > "$dir/fio-jobs.ini" <<JOBS
[global]
ioengine=$engine
direct=1
group_reporting=1
lat_percentiles=1
filename=$seq_file

[seq-write]
rw=write
bs=1M
size=$size
$seq_depth
end_fsync=1
stonewall

[seq-read]
rw=read
bs=1M
size=$size
$seq_depth
stonewall

[rand-read]
rw=randread
bs=4k
size=$size
$rand_depth
time_based=1
runtime=$runtime
stonewall

[fsync-write]
rw=write
bs=4k
size=$fsync_size
iodepth=1
fsync=1
runtime=$runtime
stonewall
JOBS

say "measuring $dir ($fs_type on $device) with $engine: file $size, reads ${runtime}s, QD $qd"
fio --output-format=json --output="$out" "$dir/fio-jobs.ini"

python3 - "$out" "$engine" "$fs_type" "$device" <<'PY' || say "results are in $out"
import json, sys
path, engine, fs_type, device = sys.argv[1:]
jobs = json.load(open(path))["jobs"]
print(f"fio on {fs_type} ({device}), engine {engine}, direct=1   -> {path}")
print(f"{'job':<12} {'MiB/s':>9} {'IOPS':>9} {'p50 us':>9} {'p99 us':>9} {'p99.9 us':>9}")
for job in jobs:
    side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    pct = side.get("lat_ns", side.get("clat_ns", {})).get("percentile", {})
    us = lambda key: f"{pct[key] / 1000:.1f}" if key in pct else "n/a"
    print(f"{job['jobname']:<12} {side['bw_bytes'] / 2**20:>9.1f} {side['iops']:>9.0f} "
          f"{us('50.000000'):>9} {us('99.000000'):>9} {us('99.900000'):>9}")
    sync = job.get("sync", {}).get("lat_ns", {}).get("percentile", {})
    if sync and "50.000000" in sync:
        print(f"{'  (fsync)':<12} {'':>9} {'':>9} {sync['50.000000'] / 1000:>9.1f} "
              f"{sync['99.000000'] / 1000:>9.1f} {sync['99.900000'] / 1000:>9.1f}")
PY
