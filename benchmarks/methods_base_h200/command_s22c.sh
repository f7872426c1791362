#!/bin/bash
# Session 22 call C: the SpinQuant points call A did not reach, with the same-call RTN rows
# nine sweep processes beside training and no rotation point finished: CPU compile contention),
# then four sweep processes: RTN at every scheme (the same-call reference), QuaRot, SpinQuant
# (schemes in priority order: W4A4 first), and the attention rows.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .peer/*.whl && export PYTHONPATH=/tmp/site:. || exit
mkdir -p $OUT/s
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/s/gpu.txt
T0=$(date +%s)
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
SWEEP_END=$(( ${BUDGET:-570} - 20 ))
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
export XLA_FLAGS=--xla_gpu_autotune_level=0
S="python3 -m experiments.sweep --config configs/sweep_llama_methods.py:base --config.out_dir=results/s22c_base"
N="--config.axes.kv=('none',) --config.axes.qk=('none',) --config.axes.r3=(False,)"
SCH="--config.axes.scheme=('int4','nvfp4','mxfp4','int4_g128','int3_g128','w4a8','int8')"
g() { local name=$1; shift; (timeout $((SWEEP_END - ($(date +%s) - T0))) $S "$@" > $OUT/s/sweep_$name.log 2>&1; echo "rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/s/sweep_$name.log) & }
g rtn "--config.axes.method=('rtn',)" "--config.axes.scheme=('fp32','mxfp4','int8','int4_g128','int3_g128','w4a8','int4')" $N
for i in $(seq 1 100); do [ -f /tmp/lowbit_jax_lm_base/final_eval.json ] && break; sleep 2; done
echo "trained at $(( $(date +%s) - T0 )) s" > $OUT/s/times.txt
(for i in $(seq 1 70); do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $OUT/s/smi.txt; uptime >> $OUT/s/load.txt; sleep 7; done) &
SMI=$!
g sq1 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('mxfp4','int8')" $N
g sq2 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int4_g128','int3_g128')" $N
g sq3 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('w4a8',)" $N
g sq4 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int4',)" "--config.axes.kv=('int4',)" "--config.axes.qk=('none',)" "--config.axes.r3=(True,)"
wait $(jobs -p | grep -v "^$SMI$")
kill $SMI 2>/dev/null
echo "sweep done at $(( $(date +%s) - T0 )) s" >> $OUT/s/times.txt
cp -r results/s22c_base $OUT/s/ 2>/dev/null; cp /tmp/lowbit_jax_lm_base/final_eval.json $OUT/s/ 2>/dev/null
cd $OUT && tar czf s.tgz s && rm -rf s && ls -la
