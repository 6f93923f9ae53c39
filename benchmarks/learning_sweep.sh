#!/usr/bin/env bash
# How much training the embedded default needs (issue 25: `make run` on 2 cores): the real DAG, bootstrap to the
# fine-tuned model's evaluation, once per setting below, each on 2 CPU cores of its own (taskset, no GPU), side by
# side on the lent machine's 16 cores. The gate is off so every run reports its accuracy.
#   PHASE=start bash benchmarks/learning_sweep.sh   install the carried wheels ($WHL), start every run detached, wait
#   PHASE=wait bash benchmarks/learning_sweep.sh    next call on the still-warm machine: wait, then report
# Each call stops waiting at DEADLINE seconds and prints, per setting: accuracy, pretraining loss, job times.
set -u -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false CUDA_VISIBLE_DEVICES=
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-560}
ROOT=/tmp/sweep
REPO=$PWD
mkdir -p "$OUT" "$ROOT"
begin=$(date +%s)
source benchmarks/device_site.sh
GATE_OFF='evaluate: {gate: {min_accuracy: 0.0, min_gain: -1.0}}'
# name|overrides (YAML flow mappings, one per line)
SETTINGS=${SETTINGS:-"default|
steps400|bootstrap: {pretrain_steps: 400}
steps400-ep2|bootstrap: {pretrain_steps: 400}
finetune: {epochs: 2}
mlp256|bootstrap: {intermediate_size: 256}
steps200|bootstrap: {pretrain_steps: 200}
ep2|finetune: {epochs: 2}
layers2|bootstrap: {num_layers: 2}
mlp256-steps400|bootstrap: {intermediate_size: 256, pretrain_steps: 400}"}

start() {
    local slot=0
    while IFS= read -r entry; do
        [ -z "$entry" ] && continue
        if [[ "$entry" == *"|"* ]]; then
            name=${entry%%|*}; rest=${entry#*|}
            dir=$ROOT/$name; mkdir -p "$dir"; : > "$dir/override.yaml"
            echo "$GATE_OFF" > "$dir/override.yaml"; [ -n "$rest" ] && echo "$rest" >> "$dir/override.yaml"
            cores="$((2 * slot)),$((2 * slot + 1))"; slot=$((slot + 1))
            [ -f "$dir/.rc" ] || [ -f "$dir/.pid" ] && continue
            (cd "$dir" && setsid nohup taskset -c "$cores" bash -c "python3 -m snakemake -s $REPO/Snakefile \
                --configfile $REPO/config/config.yaml override.yaml --cores 2 results/evaluate/finetuned.json \
                > snakemake.log 2>&1; echo \$? > .rc" > /dev/null 2>&1 & echo $! > "$dir/.pid")
        else
            echo "$entry" >> "$dir/override.yaml"
        fi
    done <<< "$SETTINGS"
}

report() {
    lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/sweep.txt"
    for dir in "$ROOT"/*/; do
        python3 - "$dir" <<'EOF' | tee -a "$OUT/sweep.txt"
import csv, json, sys
from pathlib import Path
d = Path(sys.argv[1]); r = d / "results"
rc = (d / ".rc").read_text().strip() if (d / ".rc").exists() else "running"
acc = loss = None
if (r / "evaluate/finetuned.json").exists():
    acc = json.loads((r / "evaluate/finetuned.json").read_text()).get("metrics", {}).get("accuracy")
if (r / "bootstrap/model/bootstrap.json").exists():
    loss = round(json.loads((r / "bootstrap/model/bootstrap.json").read_text())["final_loss"], 3)
times = {}
for tsv in sorted((r / "benchmarks").rglob("*.tsv")) if (r / "benchmarks").exists() else []:
    times[tsv.stem] = round(float(next(csv.DictReader(open(tsv), delimiter="\t"))["s"]))
print(json.dumps({"setting": d.name, "override": (d / "override.yaml").read_text().strip().splitlines()[1:],
                  "rc": rc, "accuracy": acc, "pretrain_loss": loss, "seconds": times}))
EOF
    done
    tar czf "$OUT/sweep_logs.tgz" -C "$ROOT" $(cd "$ROOT" && ls -d */snakemake.log */results/logs */results/evaluate 2>/dev/null) 2>/dev/null
}

case ${PHASE:-start} in
    start) rm -rf "$ROOT"/*; start ;;
esac
while [ $(( $(date +%s) - begin )) -lt "$DEADLINE" ]; do
    running=0
    for dir in "$ROOT"/*/; do [ -f "$dir/.rc" ] || running=1; done
    [ "$running" = 0 ] && break
    sleep 10
done
report
