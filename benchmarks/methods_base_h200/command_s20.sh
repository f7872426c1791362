#!/bin/bash
# Session 20 call 3 (issue 14): decode throughput (alone on the GPU), then the base model trained
# and the methods rows missing from benchmarks/methods_base_h200 + the attention rows + GPTQ at
# 128 calibration sequences, one sweep process per group sharing the GPU. $PRE runs first.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .peer/*.whl && export PYTHONPATH=/tmp/site:. || exit
mkdir -p $OUT/s
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/s/gpu.txt
T0=$(date +%s)
[ -n "$PRE" ] && (eval "$PRE") > $OUT/s/pre.log 2>&1
echo "pre took $(( $(date +%s) - T0 )) s" >> $OUT/s/pre.log
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LEFT=$(( ${BUDGET:-575} - ($(date +%s) - T0) ))
S="python3 -m experiments.sweep --config configs/sweep_llama_methods.py:base --config.out_dir=results/s20_base"
N="--config.axes.kv=('none',) --config.axes.qk=('none',) --config.axes.r3=(False,)"
g() { local name=$1; shift; (timeout $((LEFT-25)) $S "$@" > $OUT/s/sweep_$name.log 2>&1; echo "rc=$?" >> $OUT/s/sweep_$name.log) & }
g train "--config.axes.method=('rtn',)" "--config.axes.scheme=('fp32',)" $N
for i in $(seq 1 60); do [ -f /tmp/lowbit_jax_lm_base/final_eval.json ] && break; sleep 3; done
g quarot "--config.axes.method=('quarot',)" "--config.axes.scheme=('int4_g128','int3_g128','int8','w4a8','nvfp4','mxfp4')" $N
g spin_w "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int4_g128','int3_g128')" $N
g spin_8 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('w4a8','int8')" $N
g spin_4 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('nvfp4','mxfp4')" $N
g omni "--config.axes.method=('omniquant',)" "--config.axes.scheme=('nvfp4','mxfp4')" $N
g awq "--config.axes.method=('awq',)" "--config.axes.scheme=('int4','nvfp4','mxfp4')" $N
g awqnc "--config.axes.method=('awq_noclip',)" "--config.axes.scheme=('nvfp4','mxfp4')" $N
g gptq "--config.axes.method=('gptq',)" "--config.axes.scheme=('nvfp4',)" $N
g att_rtn "--config.axes.method=('rtn',)" "--config.axes.scheme=('fp32','int4')"
g att_q "--config.axes.method=('quarot',)" "--config.axes.scheme=('int4',)"
g att_s1 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int4',)" "--config.axes.r3=(False,)"
g att_s2 "--config.axes.method=('spinquant',)" "--config.axes.scheme=('int4',)" "--config.axes.r3=(True,)"
(timeout $((LEFT-25)) python3 -m experiments.sweep --config configs/sweep_llama_methods.py:base "--config.axes.method=('rtn','gptq')" "--config.axes.scheme=('int3_g128','int4_g128')" $N --config.point_kwargs.n_calib=128 --config.out_dir=results/s20_base_n128 > $OUT/s/sweep_n128.log 2>&1) &
(for i in $(seq 1 55); do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $OUT/s/smi.txt; sleep 10; done) &
sleep 1; wait $(jobs -p | head -14)
cp -r results/s20_base results/s20_base_n128 $OUT/s/ 2>/dev/null; cp /tmp/lowbit_jax_lm_base/final_eval.json $OUT/s/ 2>/dev/null
cd $OUT && tar czf s.tgz s && rm -rf s && ls -la
