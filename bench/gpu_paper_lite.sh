#!/usr/bin/env bash
# Paper-lite recipes on one GPU (issue 13 item 5): every headline method on the shipped CIFAR-10 at full
# resolution with its paper's backbone family, 3 seeds each, then one comparison table per recipe.
# Budget: all five within 8 minutes on one H100 (each recipe gets a share; a recipe that runs out is stopped,
# its finished runs are kept and `--resume` continues it). Output: runs/paper_lite/ and
# runs/paper_lite/summary.md (keep it with the note of the session that ran it).
# Usage: OPENWORLD_DATA=../shared/data bench/gpu_paper_lite.sh [seconds per recipe, default 95]
set -uo pipefail
cd "$(dirname "$0")/.."
per_recipe="${1:-95}"
out=runs/paper_lite
mkdir -p "$out"
: > "$out/summary.md"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$out/summary.md" 2>/dev/null || echo "no GPU visible" >> "$out/summary.md"
for recipe in teen sade rcal ovor legogcd; do
    file="scenarios/paperlite_${recipe}_cifar10.yaml"
    start=$(date +%s)
    timeout --signal=INT "$per_recipe" openworld run "$file" --device cuda --out "$out" --resume --no-progress \
        > "$out/${recipe}.log" 2>&1
    rc=$?
    echo "## $file (exit $rc, $(( $(date +%s) - start )) s)" >> "$out/summary.md"
    openworld compare "$out/paperlite_${recipe}_cifar10" --out "$out/paperlite_${recipe}_cifar10" >> "$out/summary.md" 2>&1 \
        || echo "(no finished runs)" >> "$out/summary.md"
done
cat "$out/summary.md"
