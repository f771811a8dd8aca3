#!/bin/bash
# Counted instructions and simulated cache misses of the default and of use_msd=false, decoding the README
# main command's documents 2..N+1 (callgrind_probe.py), which other jobs on a shared machine do not change.
# Usage: benchmarks/cpu_use_msd_auto/callgrind.sh NAME [N]   (NAME: plain... or default...; N [2])
# Two at once on two cores: CORE=0 ... & CORE=1 ... &. About 25 minutes each (valgrind runs ~100x slower).
# Output: build/callgrind/NAME.log (callgrind's totals: Ir, D1 and LL misses) and NAME.out*.
set -e
cd "$(dirname "$0")/../.."
name=$1; n=${2:-2}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p build/callgrind && rm -f /tmp/cg-"$name".*
taskset -c "${CORE:-0}" valgrind --tool=callgrind --instr-atstart=no --cache-sim=yes \
    --callgrind-out-file=build/callgrind/"$name".out \
    python benchmarks/cpu_use_msd_auto/callgrind_probe.py "$name" "$n" > build/callgrind/"$name".log 2>&1 &
until [ -f /tmp/cg-"$name".ready ]; do sleep 2; done
pid=$(cat /tmp/cg-"$name".ready)
callgrind_control -i on "$pid" >> build/callgrind/"$name".log
touch /tmp/cg-"$name".go
until [ -f /tmp/cg-"$name".done ]; do sleep 2; done
callgrind_control -i off "$pid" >> build/callgrind/"$name".log
touch /tmp/cg-"$name".stop
wait
grep -E "tokens|draft held|refs:|misses:" build/callgrind/"$name".log
