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
B="python3 benchmarks/finetune_throughput.py --steps ${STEPS:-25} --warmup 5 --lr 1e-4"
# The numbers in docs/finetuning.md, on nvidia-h200-x2: the 1B shape's variants on GPU 0 while the 1.5B pair and the
# mixed-length pair run on GPU 1, then ZeRO-2 against ZeRO-3 across both GPUs (add --consolidate to also run the
# export stage's consolidation of their checkpoints). Timeouts keep the whole call inside 10 minutes.
headline() {
    CUDA_VISIBLE_DEVICES=0 timeout 260 $B --shape llama-1b --variants baseline optimized optimized-zero3 optimized-compile --work /tmp/b0 --out /tmp/out/llama > /tmp/out-llama.txt 2>&1 &
    (CUDA_VISIBLE_DEVICES=1 timeout 190 $B --shape qwen2-1.5b --work /tmp/b1 --variants baseline optimized --out /tmp/out/qwen > /tmp/out-qwen.txt 2>&1
     CUDA_VISIBLE_DEVICES=1 timeout 110 $B --steps 15 --lengths mixed --shape llama-1b --variants baseline optimized --work /tmp/b1 --out /tmp/out/mixed > /tmp/out-mixed.txt 2>&1) &
    wait
    timeout 160 $B --shape llama-1b --nproc 2 --variants optimized optimized-zero3 --work /tmp/b0 --out /tmp/out/x2 > /tmp/out-x2.txt 2>&1
}
# What each optimization is worth and where the time goes: one-at-a-time ablations on GPU 0, a profile of the
# defaults on GPU 1 (profile-*/profile.txt in logs.tar.gz).
ablation() {
    CUDA_VISIBLE_DEVICES=0 timeout 400 $B --shape llama-1b --variants baseline optimized-no-liger optimized-unpacked optimized-zero0 optimized-stock-zero optimized-zero3-stock-zero --work /tmp/b0 --out /tmp/out/ablate > /tmp/out-ablate.txt 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 150 $B --steps 12 --profile --shape llama-1b --variants optimized --work /tmp/b1 --out /tmp/out/profile > /tmp/out-profile.txt 2>&1 &
    wait
    head -1 /tmp/out/profile/profile-*/profile.txt
}
# Run-to-run spread of the 1B pair: two more baseline/defaults pairs on each GPU.
repeat() {
    for gpu in 0 1; do
        (for i in 1 2; do CUDA_VISIBLE_DEVICES=$gpu timeout 140 $B --shape llama-1b --variants baseline optimized --work /tmp/b$gpu --out /tmp/out/repeat-$gpu-$i > /tmp/out-repeat-$gpu-$i.txt 2>&1; done) &
    done
    wait
}
# Issue 17, the 8B shape on both GPUs (2 ranks): seq 4096 at 4 rows per rank per step (micro-batch 1 x accumulation 4)
# beside stock ZeRO-2 with a profile of the defaults, then seq 16384 and 32768 with the defaults alone (stock ZeRO-2
# does not fit there without checkpointing). VARIANTS4K/VARIANTSLONG/SHAPE4K override what runs.
long8b() {
    timeout ${T4K:-300} $B --shape ${SHAPE4K:-llama-8b} --nproc 2 --seq 4096 --micro-batch 1 --grad-accum ${ACCUM:-4} --steps 10 --warmup 3 \
        --variants ${VARIANTS4K:-baseline optimized} --profile ${PROFILE:-optimized} --work /tmp/b --out /tmp/out/s4096 > /tmp/out-4096.txt 2>&1
    for seq in ${LONGSEQS:-16384 32768}; do
        steps=$(( seq > 16384 ? 6 : 8 ))
        timeout ${TLONG:-150} $B --shape llama-8b --nproc 2 --seq $seq --micro-batch 1 --steps $steps --warmup 2 --log-every 2 \
            --variants ${VARIANTSLONG:-optimized} --work /tmp/b --out /tmp/out/s$seq > /tmp/out-$seq.txt 2>&1
    done
}
# Issue 17, the final defaults: the R1-Distill-Qwen-7B shape at seq 4096 beside stock ZeRO-2, then the 8B shape's
# ZeRO-3 at 4096 and the defaults at 16384 and 32768.
final() {
    timeout 240 $B --shape qwen2-7b --nproc 2 --seq 4096 --micro-batch 1 --grad-accum 4 --steps 10 --warmup 3 \
        --variants baseline optimized optimized-zero3 --work /tmp/b --out /tmp/out/q4096 > /tmp/out-q4096.txt 2>&1
    timeout 140 $B --shape llama-8b --nproc 2 --seq 4096 --micro-batch 1 --grad-accum 4 --steps 10 --warmup 3 \
        --variants optimized optimized-zero3 --work /tmp/b --out /tmp/out/s4096 > /tmp/out-4096.txt 2>&1
    timeout 65 $B --shape llama-8b --nproc 2 --seq 16384 --micro-batch 1 --steps 8 --warmup 2 --log-every 2 \
        --variants optimized --work /tmp/b --out /tmp/out/s16384 > /tmp/out-16384.txt 2>&1
    timeout 80 $B --shape llama-8b --nproc 2 --seq 32768 --micro-batch 1 --steps 6 --warmup 2 --log-every 2 \
        --variants optimized --work /tmp/b --out /tmp/out/s32768 > /tmp/out-32768.txt 2>&1
}
# The 1B pair on one GPU (nvidia-h200), to check the 1B goals still hold with the current defaults.
onegpu() {
    timeout 200 $B --shape llama-1b --variants baseline optimized --work /tmp/b0 --out /tmp/out/llama > /tmp/out-llama.txt 2>&1
}
${PHASE:-headline}
cp /tmp/out-*.txt $OUT/ 2>/dev/null
tar czf $OUT/logs.tar.gz -C /tmp out 2>/dev/null
for f in /tmp/out-*.txt; do echo "=== $f"; grep -v -E "Warning|warn\(|^\s*$|it/s\]" $f | tail -25; done
