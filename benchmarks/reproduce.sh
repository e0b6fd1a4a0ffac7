#!/usr/bin/env bash
# The runs behind docs/RESULTS.md, in two lanes that can run side by side on a 2-core machine:
#   benchmarks/reproduce.sh shapes     # MoT, dense and the ablations on the shapes world
#   benchmarks/reproduce.sh modalities # Fashion-MNIST latents, speech (three towers), Chameleon
#   benchmarks/reproduce.sh report     # evaluations, comparisons and plots (after both lanes)
# Every step is skipped when its output exists, and an interrupted training run resumes, so the
# script can be rerun after a crash. RUNS (default runs/repro) holds the run directories;
# EVAL_N (default 256) is the number of prompts and images per metric.
set -euo pipefail
M=${MOTFUSION:-.venv/bin/motfusion}
R=${RUNS:-runs/repro}
N=${EVAL_N:-256}

# train OUT RECIPE [key=value ...]: start the run, or resume it (a finished run returns at once)
train() {
    local out=$1 recipe=$2; shift 2
    if [ -f "$out/config.json" ]; then
        $M train --resume --out "$out"
    else
        $M train --recipe "$recipe" --out "$out" "$@"
    fi
}

# evaluate RUN SUITE [args]: writes RUN/eval_SUITE.json once
evaluate() {
    local run=$1 suite=$2; shift 2
    [ -f "$run/eval_$suite.json" ] || $M eval --ckpt "$run" --suite "$suite" --n "$N" "$@"
}

shapes() {
    train "$R/mot" small
    train "$R/dense" small model.untie=
    train "$R/causal" small model.image_attention=causal
    train "$R/nocap" small objective.image_first_noise_cap=none
    train "$R/untie-ffn" small model.untie=ffn
    train "$R/untie-ffn-attn" small model.untie=ffn,attn
    train "$R/align" small objective.contrastive_weight=0.1 model.align_dim=64
}

modalities() {
    [ -f runs/vae-fashion/weights.safetensors ] || $M train-vae --dataset fashion --out runs/vae-fashion \
        image_size=32 downsample=4 latent_channels=4 channels=16 steps=500
    [ -f runs/classifier/weights.safetensors ] || $M train-classifier --out runs/classifier
    [ -f runs/clip-fashion/weights.safetensors ] || $M train-clip --dataset fashion --out runs/clip-fashion
    train "$R/fashion" fashion
    [ -f runs/speech-data/dataset.json ] || $M make-speech-data --out runs/speech-data --n 3000
    [ -d runs/speech-data/tokenizer ] || $M train-speech-tokenizer --data runs/speech-data
    train "$R/speech" speech-mixed
    train "$R/speech-dense" speech-mixed model.untie=
    train "$R/loo-text-image" loo-text-image
    train "$R/loo-image-speech" loo-image-speech
    [ -f runs/vq-shapes32/weights.safetensors ] || $M train-vq --dataset shapes --out runs/vq-shapes32
    train "$R/chameleon" chameleon-demo
}

report() {
    for run in mot dense causal nocap untie-ffn untie-ffn-attn align chameleon; do
        evaluate "$R/$run" shapes
    done
    evaluate "$R/fashion" fashion --classifier runs/classifier --clip runs/clip-fashion
    evaluate "$R/speech" speech
    evaluate "$R/speech" shapes
    evaluate "$R/speech-dense" speech
    evaluate "$R/speech-dense" shapes
    for run in loo-text-image loo-image-speech; do
        evaluate "$R/$run" speech
        evaluate "$R/$run" shapes
    done
    $M compare "$R/dense" "$R/mot" --out "$R/compare-mot-dense"
    $M compare "$R/untie-ffn" "$R/mot" --out "$R/compare-mot-untie-ffn"
    $M compare "$R/speech-dense" "$R/speech" --out "$R/compare-speech-mot-dense"
    $M plot "$R/mot" "$R/dense" "$R/untie-ffn" "$R/untie-ffn-attn" --out "$R/untie.png"
    $M plot "$R/mot" "$R/causal" "$R/nocap" --out "$R/attention-cap.png"
    PY=$(dirname "$M")/python
    $PY benchmarks/grids.py "$R/dense" "$R/mot" "$R/causal" "$R/chameleon" "$R/speech" --n 2 \
        --prompt "a red circle" --prompt "a big blue square" --prompt "a green triangle at the top" \
        --prompt "a yellow circle left of a purple square" --prompt "two red triangles" \
        --out docs/results_shapes.png
    $PY benchmarks/grids.py "$R/fashion" --n 4 --prompt "a t-shirt" --prompt "a trouser" --prompt "a pullover" \
        --prompt "a dress" --prompt "a coat" --prompt "a sandal" --prompt "a shirt" --prompt "a sneaker" \
        --prompt "a bag" --prompt "an ankle boot" --out docs/results_fashion.png
    $PY benchmarks/summarize.py --runs "$R" > "$R/tables.md"
}

"${1:?usage: reproduce.sh shapes|modalities|report}"
