#!/bin/bash
# Session 23 call B (issue 14): train `base` alone, then the SpinQuant points not yet run (MXFP4, W3A16 int3 g128,
# W8A8 int8), one process each, beside one RTN process for the same-call reference; then, alone on the GPU, the
# KV-cache decode rows at batch 16 after the decode-step change, if time is left.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .peer/*.whl && export PYTHONPATH=/tmp/site:. || exit
mkdir -p $OUT/s/decode
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/s/gpu.txt
T0=$(date +%s)
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
B=${BUDGET:-580}
SWEEP_END=$(( B - 8 ))
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
export XLA_FLAGS=--xla_gpu_autotune_level=0
S="python3 -m experiments.sweep --config configs/sweep_llama_methods.py:base --config.out_dir=results/s23b_base"
N="--config.axes.kv=('none',) --config.axes.qk=('none',) --config.axes.r3=(False,)"
g() { local name=$1; shift; (timeout $((SWEEP_END - ($(date +%s) - T0))) $S "$@" > $OUT/s/sweep_$name.log 2>&1; echo "rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/s/sweep_$name.log) & }
g rtn "--config.axes.method=('rtn',)" "--config.axes.scheme=('fp32','mxfp4','int3_g128','int8')" $N
for i in $(seq 1 150); do [ -f /tmp/lowbit_jax_lm_base/final_eval.json ] && break; sleep 2; done
echo "trained at $(( $(date +%s) - T0 )) s" > $OUT/s/times.txt
g sq1 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('mxfp4',)" $N
g sq2 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int3_g128',)" $N
g sq3 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int8',)" $N
wait
echo "sweep done at $(( $(date +%s) - T0 )) s" >> $OUT/s/times.txt
cp -r results/s23b_base $OUT/s/ 2>/dev/null; cp /tmp/lowbit_jax_lm_base/final_eval.json $OUT/s/ 2>/dev/null
LIM=$(( B - ($(date +%s) - T0) - 10 ))
if [ $LIM -gt 60 ]; then
  timeout $LIM python3 -m experiments.bench_decode --config=base --batches=16 --schemes=bf16,int8,int4,kivi4,fp8_e4m3 --iters=3 \
    --out_dir=$OUT/s/decode --tag=decode_base_h200_b16_s23 > $OUT/s/decode_b16.log 2>&1
  echo "decode b16 rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/s/times.txt
fi
cd $OUT && tar czf s.tgz s && rm -rf s && ls -la
