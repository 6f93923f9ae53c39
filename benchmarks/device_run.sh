#!/usr/bin/env bash
# Device-run helper (lent GPU machine): install carried wheels, check, then benchmark. Run from the tree root:
#   bash benchmarks/device_run.sh   (carried wheels in ../.whl; writes everything under $OUT)
set -u
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
WHL=${WHL:-../.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHL/base/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
if python3 -c "import sys, huggingface_hub as h; from packaging.version import Version as V; sys.exit(0 if V('1.31') <= V(h.__version__) < V('3') else 1)"; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHL/tf/*.whl && echo "installed transformers 5.24 (the pinned release)" | tee -a $OUT/device.txt
else
    echo "kept the image's transformers: its huggingface_hub is outside transformers 5.24's range" | tee -a $OUT/device.txt
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $OUT/device.txt
python3 -c "import torch, transformers, deepspeed, liger_kernel, inspect; from torch.nn.attention.varlen import varlen_attn; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__); print('varlen_attn', inspect.signature(varlen_attn))" 2>&1 | tee -a $OUT/device.txt
[ -n "${SKIPTEST:-}" ] || python3 -m pytest -q -p no:cacheprovider tests/test_finetune_units.py -k "varlen or speed" 2>&1 | tail -5 | tee -a $OUT/device.txt
B="python3 benchmarks/finetune_throughput.py --steps ${STEPS:-25} --warmup 5"
headline() {
# Both shapes at once, one GPU each (each shape's baseline and optimized runs share its GPU), then the
# 2-GPU ZeRO-3 run with the export stage's consolidation. Timeouts keep the whole call inside 10 minutes.
CUDA_VISIBLE_DEVICES=0 timeout ${T1:-310} $B --shape llama-1b --work /tmp/b0 --out /tmp/out/llama > /tmp/out-llama.txt 2>&1 &
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    CUDA_VISIBLE_DEVICES=1 timeout ${T1:-310} $B --shape qwen2-1.5b --work /tmp/b1 --out /tmp/out/qwen > /tmp/out-qwen.txt 2>&1 &
    wait
    timeout ${T2:-200} $B --shape llama-1b --nproc 2 --variants optimized-zero3 --consolidate --work /tmp/b0 --out /tmp/out/zero3x2 > /tmp/out-zero3x2.txt 2>&1
else
    wait
    timeout ${T1:-310} $B --shape qwen2-1.5b --work /tmp/b1 --out /tmp/out/qwen > /tmp/out-qwen.txt 2>&1
fi
}
# What each optimization is worth and where the time goes: the 1B pair alone on one GPU (no neighbour), then
# one-at-a-time ablations and profiles on both GPUs, then ZeRO-2 vs ZeRO-3 across the 2 GPUs.
ablation() {
    CUDA_VISIBLE_DEVICES=0 timeout 150 $B --shape llama-1b --variants baseline optimized --work /tmp/b0 --out /tmp/out/alone > /tmp/out-alone.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 200 $B --shape llama-1b --variants optimized-no-liger optimized-unpacked optimized-zero0 --work /tmp/b0 --out /tmp/out/ablate > /tmp/out-ablate.txt 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 240 $B --steps 12 --profile --shape llama-1b qwen2-1.5b --variants baseline optimized --work /tmp/b1 --out /tmp/out/profile > /tmp/out-profile.txt 2>&1 &
    wait
    timeout 140 $B --shape llama-1b --nproc 2 --variants optimized optimized-zero3 --work /tmp/b0 --out /tmp/out/x2 > /tmp/out-x2.txt 2>&1
    head -1 /tmp/out/profile/profile-*/profile.txt
}
# After the ablation: rows of one length stacked (batched cuDNN attention), one shape at a time, GPU 0 only.
final() {
    F="python3 benchmarks/finetune_throughput.py --steps 20 --warmup 5 --lr 1e-4"
    CUDA_VISIBLE_DEVICES=0 timeout 200 $F --shape llama-1b --variants baseline optimized optimized-zero0 optimized-zero3 --work /tmp/b0 --out /tmp/out/llama > /tmp/out-llama.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 130 $F --shape qwen2-1.5b --variants baseline optimized --work /tmp/b1 --out /tmp/out/qwen > /tmp/out-qwen.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 90 $F --steps 15 --lengths mixed --shape llama-1b --variants baseline optimized --work /tmp/b0 --out /tmp/out/mixed > /tmp/out-mixed.txt 2>&1
}
# ZeRO knobs sized from the model (zero_tuning) against the Trainer's, torch.compile once, the 1.5B shape, and a
# profile of what is left; on nvidia-h200-x2 (one shape or variant list per GPU, the two GPUs side by side).
tune() {
    CUDA_VISIBLE_DEVICES=0 timeout 330 $B --shape llama-1b --variants baseline optimized optimized-stock-zero optimized-zero0 --work /tmp/b0 --out /tmp/out/tune0 > /tmp/out-tune0.txt 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 330 $B --shape llama-1b --variants optimized-zero3 optimized-zero3-stock-zero optimized-compile --work /tmp/b1 --out /tmp/out/tune1 > /tmp/out-tune1.txt 2>&1 &
    wait
    CUDA_VISIBLE_DEVICES=0 timeout 180 $B --shape qwen2-1.5b --variants baseline optimized --work /tmp/b0 --out /tmp/out/qwen > /tmp/out-qwen.txt 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 150 $B --steps 12 --profile --shape llama-1b --variants optimized --work /tmp/b1 --out /tmp/out/profile > /tmp/out-profile.txt 2>&1 &
    wait
    head -1 /tmp/out/profile/profile-*/profile.txt
}
${PHASE:-headline}
cp /tmp/out-*.txt $OUT/ 2>/dev/null
tar czf $OUT/logs.tar.gz -C /tmp out 2>/dev/null
for f in /tmp/out-*.txt; do echo "=== $f"; grep -v -E "Warning|warn\(|^\s*$|it/s\]" $f | tail -25; done
