#!/bin/bash
# Issue 10 GPU reruns: three qat_study processes share the one H200.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .peer/*.whl && export PYTHONPATH=/tmp/site:. || exit
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpu.txt
python3 -c "import jax; print(jax.__version__, jax.devices())" >> $OUT/gpu.txt 2>&1
B="python3 -m experiments.qat_study --config configs/qat_study.py:base"
(timeout 545 $B --workdir /tmp/qsA --config.parts=scratch --config.float_steps=200 > $OUT/scratch_log.txt 2>&1; echo "rc=$?" >> $OUT/scratch_log.txt) &
(timeout 545 $B --workdir /tmp/qsB --config.parts=float,qat --config.float_steps=300 --config.qat_steps=100 --config.qat_warmup=10 --config.qat_schemes=w4a4_nvfp4 --config.qat_methods=rtn,lsq,ste > $OUT/nvfp4_log.txt 2>&1; echo "rc=$?" >> $OUT/nvfp4_log.txt) &
(timeout 545 $B --workdir /tmp/qsC --config.parts=optim --config.float_steps=200 > $OUT/optim_log.txt 2>&1; echo "rc=$?" >> $OUT/optim_log.txt) &
(for i in $(seq 1 50); do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $OUT/smi.txt; sleep 10; done) &
wait %1 %2 %3
for d in A B C; do mkdir -p $OUT/$d; cp /tmp/qs$d/*.json $OUT/$d/ 2>/dev/null; done
ls -la $OUT/*
