#!/bin/bash
# Issue 14 on the H200: the decoder-LM methods table on the base model (trained here first),
# one sweep process per method sharing the GPU, plus KV-cache perplexity rows.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .peer/*.whl && export PYTHONPATH=/tmp/site:. || exit
export XLA_PYTHON_CLIENT_PREALLOCATE=false
S="python3 -m experiments.sweep --config configs/sweep_llama_methods.py:base"
W=/tmp/lowbit_jax_lm_base
mkdir -p $OUT/r
METHODS=${METHODS:-"gptq awq awq_noclip smoothquant quarot spinquant omniquant"}
(timeout 515 $S --config.axes.method="('rtn',)" > $OUT/r/sweep_rtn.log 2>&1) &
(timeout 330 python3 -m pytest -q -x -p no:cacheprovider --runslow tests/core/test_fused.py > $OUT/r/test_fused_h200.txt 2>&1; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/core/test_ops.py tests/kernels/test_gpu_kernels.py > $OUT/r/test_gpu_h200.txt 2>&1) &
for i in $(seq 1 100); do [ -f $W/final_eval.json ] && break; sleep 3; done
for m in $METHODS; do
  (timeout 500 $S --config.axes.method="('$m',)" > $OUT/r/sweep_$m.log 2>&1) &
done
(timeout 490 python3 -m experiments.kv_cache_ppl --workdir $W --seq_len 512 --max_tokens 16384 --out $OUT/r/results_kvcache_base.md > $OUT/r/kv.log 2>&1) &
(for i in $(seq 1 55); do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $OUT/r/smi.txt; sleep 10; done) &
wait %1 %2 %3 %4 %5 %6 %7 %8 %9 %10
timeout 45 $S > $OUT/r/sweep_all.log 2>&1
cp -r results/sweep_llama_methods_base $OUT/r/ 2>/dev/null; cp $W/final_eval.json $OUT/r/ 2>/dev/null
cd $OUT && tar czf r.tgz r && rm -rf r && ls -la
