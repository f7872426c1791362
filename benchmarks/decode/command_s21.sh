#!/bin/bash
# Session 21 call 2 (call 1 finished no rotation point: compile storms; now XLA autotuning off,
# a shared persistent compilation cache, points ordered by priority)
# Session 21 call 1 (issue 14): the base model trained, the QuaRot/SpinQuant rows (fixed for bf16
# after session 20) and their attention rows, one sweep process per group sharing the GPU; then the
# KV-cache decode throughput of base at batch 1 and 16, alone on the GPU (250 s reserved).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .peer/*.whl && export PYTHONPATH=/tmp/site:. || exit
mkdir -p $OUT/s
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/s/gpu.txt
T0=$(date +%s)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
SWEEP_END=$(( ${BUDGET:-575} - 185 ))
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
export XLA_FLAGS=--xla_gpu_autotune_level=0
S="python3 -m experiments.sweep --config configs/sweep_llama_methods.py:base --config.out_dir=results/s21_base"
N="--config.axes.kv=('none',) --config.axes.qk=('none',) --config.axes.r3=(False,)"
g() { local name=$1; shift; (timeout $((SWEEP_END - ($(date +%s) - T0))) $S "$@" > $OUT/s/sweep_$name.log 2>&1; echo "rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/s/sweep_$name.log) & }
g train "--config.axes.method=('rtn',)" "--config.axes.scheme=('fp32','int4')" $N
for i in $(seq 1 60); do [ -f /tmp/lowbit_jax_lm_base/final_eval.json ] && break; sleep 3; done
echo "trained at $(( $(date +%s) - T0 )) s" > $OUT/s/times.txt
g q_a "--config.axes.method=('quarot',)" "--config.axes.scheme=('int4','int4_g128')" $N
g s_a "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int4','int4_g128')" $N
g q_b "--config.axes.method=('quarot',)" "--config.axes.scheme=('nvfp4','mxfp4')" $N
g s_b "--config.axes.method=('spinquant',)" "--config.axes.scheme=('nvfp4','mxfp4')" $N
g q_c "--config.axes.method=('quarot',)" "--config.axes.scheme=('int3_g128','w4a8')" $N
g s_c "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int3_g128','w4a8')" $N
g qs_8 "--config.axes.method=('quarot','spinquant')" "--config.axes.scheme=('int8',)" $N
g att_q "--config.axes.method=('quarot',)" "--config.axes.scheme=('int4',)" "--config.axes.kv=('int4',)" "--config.axes.qk=('none',)"
g att_s "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int4',)" "--config.axes.kv=('none',)" "--config.axes.qk=('int4',)"
(for i in $(seq 1 40); do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $OUT/s/smi.txt; sleep 8; done) &
SMI=$!
wait $(jobs -p | grep -v "^$SMI$")
kill $SMI 2>/dev/null
echo "sweep done at $(( $(date +%s) - T0 )) s" >> $OUT/s/times.txt
cp -r results/s21_base $OUT/s/ 2>/dev/null; cp /tmp/lowbit_jax_lm_base/final_eval.json $OUT/s/ 2>/dev/null
unset XLA_PYTHON_CLIENT_PREALLOCATE XLA_FLAGS
for b in 1 16; do
  LEFT=$(( ${BUDGET:-575} - ($(date +%s) - T0) - 10 ))
  [ $LEFT -gt 30 ] || break
  timeout $(( b == 1 ? LEFT * 45 / 100 : LEFT )) python3 -m experiments.bench_decode --config=base --batches=$b \
    --schemes=bf16,int8,int4,kivi4,fp8_e4m3 --iters=3 --out_dir=$OUT/s/decode --tag=decode_base_h200_b$b \
    > $OUT/s/decode_b$b.log 2>&1
  echo "decode b$b rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/s/times.txt
done
cd $OUT && tar czf s.tgz s && rm -rf s && ls -la
