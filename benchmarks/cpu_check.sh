#!/usr/bin/env bash
# The CPU speed checks of issue 23 as one run, for a session on a CPU kind the tables of benchmarks/RESULTS.md do
# not hold yet (an AMD EPYC with AVX2 only, one with AVX-512, a new Xeon): the CPU named, then per layer the fused
# Winograd kernels' two block rules, the whole networks with and without the fused kernels, the fused group norm
# against torch's operators (per layer and per network), and the targets
# against diffusers' UNet2DModel (training and sampling, float32; bf16 where the CPU has it natively; held to
# AVX2 where it has AVX-512), each in one interleaved process, 2 threads. About 30 minutes on a 2-core Xeon;
# nothing else should run meanwhile. Each table goes to its own file under $OUT and to the terminal:
#
#   bash benchmarks/cpu_check.sh            # OUT=benchmarks/out/cpu_check (ignored by git)
#
# Then copy the tables into RESULTS.md with the CPU's line (cpu.txt) beside them.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/cpu_check}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
flags=$(grep -m1 '^flags' /proc/cpuinfo)
{ date -u '+%Y-%m-%d %H:%M UTC'
  lscpu | grep -E '^(Model name|CPU family|Model|L1d|L2|L3|CPU\(s\))'
  echo "$flags" | tr ' ' '\n' | grep -xE 'avx2|fma|avx512f|avx512_bf16|amx_tile|amx_bf16' | tr '\n' ' '; echo
  $PY -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"; } 2>&1 | tee "$OUT/cpu.txt"
run() {  # run NAME COMMAND...: its table to $OUT/NAME.txt
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.txt"
  "$@" 2>&1 | grep -vE '^(W[0-9]|USDT|ERROR:)' | tee -a "$OUT/$name.txt"
}
run blocks_fashion $PY benchmarks/winograd_fused.py --blocks --network fashion --batch 64
run blocks_cifar10 $PY benchmarks/winograd_fused.py --blocks --network cifar10 --batch 16
for net in "digits 128" "fashion 64" "cifar10 16"; do
  set -- $net
  run "networks_$1" $PY benchmarks/winograd_fused.py --networks --blocks --network "$1" --batch "$2" --rounds 11
done
# the fused group norm against torch's operators per layer and per network (inference): on two AMD CPUs speed.py's
# CIFAR-10 sampling row without the kernel read 4-10% faster (RESULTS, sessions 14-15), not seen on the Xeon
run gn_layers $PY benchmarks/gn_paths.py --rounds 3
run gn_networks $PY benchmarks/gn_paths.py --networks --rounds 5
SPEED="benchmarks/speed.py --only ours,diffusers --keep-freed-memory"
run speed_fashion $PY $SPEED --network fashion --train-batch 64 --sample-batch 64 --reps 5
run speed_cifar10 $PY $SPEED --network cifar10
run speed_digits $PY $SPEED --network digits --train-batch 128 --sample-batch 64 --reps 5
if echo "$flags" | grep -qw avx512_bf16; then  # native bf16: the issue's bf16 target
  run speed_fashion_bf16 $PY $SPEED --network fashion --train-batch 64 --sample-batch 64 --reps 3 --bf16
  # the CIFAR-10 network's bf16 row was the one missed on the AVX-512 EPYC of 2026-12-01 (1.15-1.17x)
  run speed_cifar10_bf16 $PY $SPEED --network cifar10 --reps 3 --bf16
fi
if echo "$flags" | grep -qw avx512f; then  # an AVX-512 CPU held to AVX2 (the kernels then build for haswell)
  export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
  run speed_fashion_avx2 $PY $SPEED --network fashion --train-batch 64 --sample-batch 64 --reps 5
fi
echo "tables in $OUT"
