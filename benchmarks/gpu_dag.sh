#!/usr/bin/env bash
# The DAG on the lent H200 (issue 21): carried wheels installed, then PHASE smoke (the GPU unit tests and the
# evaluation benchmark) or dag (the whole DAG, data to promote, on config/gpu.yaml, with the job table). From the
# repo root on the device, wheels in $WHL (docs/gpu-device.md says which and why):
#   PHASE=smoke bash benchmarks/gpu_dag.sh      PHASE=dag DAG_TIMEOUT=560 bash benchmarks/gpu_dag.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=/tmp/torch_ext
WHL=${WHL:-../.whl}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, deepspeed, modelopt, mlflow, snakemake, onnxruntime_genai as og; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'modelopt', modelopt.__version__, 'mlflow', mlflow.__version__, 'ort-genai', og.__version__)" 2>&1 | tee -a "$OUT/device.txt"

smoke() {
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_generation.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
    timeout ${BENCH_TIMEOUT:-330} python3 benchmarks/eval_throughput.py --json "$OUT/eval_throughput.json" 2>&1 \
        | grep -v -i warn | tee "$OUT/eval_throughput.txt"
}

dag() {
    [ -f /tmp/gpu-base/config.json ] || python3 -c "from tests.families import make; make('r1-distill-qwen', '/tmp/gpu-base', shape=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=2048))" || exit 1
    # results/ outside the carried tree, so a second call on the warm machine continues where the first stopped
    mkdir -p /tmp/dag-results && ln -sfn /tmp/dag-results results
    start=$(date +%s)
    timeout ${DAG_TIMEOUT:-540} python3 -m snakemake --configfile config/gpu.yaml --profile profiles/default --cores 16 \
        --scheduler greedy --resources gpu=1 ${TARGETS:-} > "$OUT/snakemake.log" 2>&1
    rc=$?
    echo "snakemake exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/dag.txt"
    tail -30 "$OUT/snakemake.log"
    python3 benchmarks/gpu_dag_report.py results | tee -a "$OUT/dag.txt"
    tar czf "$OUT/logs.tar.gz" results/logs results/benchmarks results/plan results/evaluate results/evaluate_quantized \
        $(ls -d results/quantize/*/quantize.json results/quantize/*/checkpoint/*.json results/engine/*/*/*.json 2>/dev/null) 2>/dev/null
}
${PHASE:-smoke}
