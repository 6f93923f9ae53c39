#!/usr/bin/env bash
# The DAG on the lent H200 (issue 21), from the repo root on the device with the carried wheels in $WHL
# (docs/gpu-device.md says which and why):
#   PHASE=all bash benchmarks/gpu_dag.sh     first call: GPU tests, the evaluation benchmark, then the DAG started
#   PHASE=wait bash benchmarks/gpu_dag.sh    next calls on the still-warm machine: wait for the DAG, report
#   PHASE=dag bash benchmarks/gpu_dag.sh     the DAG alone (started, or resumed, and waited for)
#   PHASE=export bash benchmarks/gpu_dag.sh  each scheme quantized on the GPU, its export read as the engines' loaders do
# The DAG (config/gpu.yaml, results in /tmp/dag-results) runs detached, so it goes on between calls; each call stops
# waiting at DEADLINE seconds (the device's 10-minute limit a call) and prints the job table so far.
set -u -o pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=/tmp/torch_ext
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-570}
RESULTS=/tmp/dag-results
mkdir -p "$OUT" "$RESULTS"
begin=$(date +%s)
source benchmarks/device_site.sh
ln -sfn "$RESULTS" results

prepare() {  # in the background while the tests run: the base model, and ModelOpt's CUDA extensions compiled once
    [ -f /tmp/gpu-base/config.json ] || python3 -c "from tests.families import make; make('r1-distill-qwen', '/tmp/gpu-base', shape=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=2048))" > "$OUT/base.log" 2>&1
    python3 -c "from modelopt.torch.quantization.extensions import get_cuda_ext, get_cuda_ext_fp8; get_cuda_ext(); get_cuda_ext_fp8()" > "$OUT/extensions.log" 2>&1
    echo "prepared after $(( $(date +%s) - begin )) s" >> "$OUT/extensions.log"
}

smoke() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
    python3 -c "import torch, transformers, deepspeed, modelopt, mlflow, snakemake; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'modelopt', modelopt.__version__, 'mlflow', mlflow.__version__)" 2>&1 | tee -a "$OUT/device.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_generation.py tests/test_engine_pytorch.py \
        "tests/test_closeness.py::test_on_the_gpu_the_figures_match_the_cpu" 2>&1 | tail -8 | tee "$OUT/tests.txt"
    timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/eval_throughput.py --json "$OUT/eval_throughput.json" 2>&1 \
        | grep -v -i warn | tee "$OUT/eval_throughput.txt"
}

start_dag() {  # detached: it survives the end of this call; --rerun-incomplete resumes a killed one
    if [ -f "$RESULTS/.dag.pid" ] && kill -0 "$(cat "$RESULTS/.dag.pid")" 2>/dev/null; then return; fi
    [ -f "$RESULTS/.dag.rc" ] && return
    while [ ! -f /tmp/gpu-base/config.json ]; do sleep 2; done
    date +%s > "$RESULTS/.dag.start"
    setsid nohup bash -c "python3 -m snakemake --configfile config/gpu.yaml --profile profiles/default --cores 16 \
        --scheduler greedy --resources gpu=4 ${TARGETS:-} >> $RESULTS/snakemake.log 2>&1; echo \$? > $RESULTS/.dag.rc" \
        > /dev/null 2>&1 &
    echo $! > "$RESULTS/.dag.pid"
}

wait_dag() {
    while [ ! -f "$RESULTS/.dag.rc" ] && [ $(( $(date +%s) - begin )) -lt "$DEADLINE" ]; do sleep 5; done
    if [ -f "$RESULTS/.dag.rc" ]; then
        echo "snakemake exit $(cat "$RESULTS/.dag.rc") after $(( $(stat -c %Y "$RESULTS/.dag.rc") - $(cat "$RESULTS/.dag.start") )) s" | tee "$OUT/dag.txt"
    else
        echo "snakemake still running after $(( $(date +%s) - $(cat "$RESULTS/.dag.start") )) s" | tee "$OUT/dag.txt"
    fi
    cp "$RESULTS/snakemake.log" "$OUT/snakemake.log"
    grep -E "^(Error|Exception|.*Error:)|steps \(" "$OUT/snakemake.log" | tail -8
    python3 benchmarks/gpu_dag_report.py results | tee -a "$OUT/dag.txt"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader >> "$OUT/dag.txt"
    df -h /tmp | tail -1 >> "$OUT/dag.txt"
    tar czf "$OUT/logs.tar.gz" results/logs results/benchmarks results/plan results/evaluate results/evaluate_quantized \
        results/select results/rollout results/summary results/benchmark \
        $(ls -d results/quantize/*/quantize.json results/quantize/*/checkpoint/*.json results/engine/*/*/*.json 2>/dev/null) 2>/dev/null
}

case ${PHASE:-all} in
    all) prepare & smoke; wait; start_dag; wait_dag ;;
    dag) prepare; start_dag; wait_dag ;;
    wait) start_dag; wait_dag ;;
    export) python3 -c "from modelopt.torch.quantization.extensions import get_cuda_ext, get_cuda_ext_fp8; get_cuda_ext(); get_cuda_ext_fp8()" 2>&1 | grep Loaded
            timeout 400 python3 benchmarks/gpu_export.py --work /tmp/gpu-export 2>&1 | grep '^{' | tee "$OUT/gpu_export.jsonl" ;;
esac
