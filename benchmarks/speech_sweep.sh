#!/usr/bin/env bash
# The runs behind docs/RESULTS.md, "speech-demo": the speech pieces (data, codecs, decoders, judge),
# the recipe's variants and their evaluation on every held-out utterance, read by the recipe's own
# judge and by the judge of the mixed-English data (runs/speech-data/asr-judge, "Intelligibility").
#   benchmarks/speech_sweep.sh pieces | runs | eval
set -euo pipefail
M=${MOTFUSION:-.venv/bin/motfusion}
R=${RUNS:-runs/spw}
D=runs/speech-shapes
MIXED_JUDGE=runs/speech-data/asr-judge
train() { local name=$1; shift; $M train --recipe speech-demo --out "$R/$name" train.tensorboard=false "$@"; }
SCREEN="train.steps=1500 model.vocab_sizes=speech:200 data.dataset=speech:$D"  # the screening runs' base

pieces() {  # what `motfusion demo --recipe speech-demo` makes, plus the k=100 codec
    [ -f $D/dataset.json ] || $M make-speech-data --out $D --n 3000 --sources shapes
    [ -d $D/tokenizer ] || $M train-speech-tokenizer --data $D --k 200
    [ -d $D/tokenizer/decoder ] || $M train-unit-vocoder --data $D --steps 1000
    [ -d $D/asr-judge ] || $M train-asr-judge --data $D --steps 800
    [ -d $D/tokenizer-k100 ] || $M train-speech-tokenizer --data $D --k 100 --out $D/tokenizer-k100
    [ -d $D/tokenizer-k100/decoder ] || $M train-unit-vocoder --data $D --codec $D/tokenizer-k100 --steps 1000
    for codec in tokenizer tokenizer-k100; do
        $M eval-speech-codec --data $D --codec $D/$codec --judge $MIXED_JUDGE --n 163
    done
}

runs() {
    train base                                         # the recipe: k=200, bytes, EMA 0.995, 1,500 steps
    train bpe data.tokenizer=bpe:512
    train k100 data.dataset=speech:$D/tokenizer-k100 model.vocab_sizes=speech:100
    train noema train.ema=0
    train share25 data.speech_shapes_share=0.25
    train s3000 train.steps=3000
    train seed1 train.seed=1
}

eval() {
    for run in "$R"/*/; do
        run=${run%/}
        [ -f "$run/eval_speech.json" ] || $M eval --ckpt "$run" --suite speech --n 163 --val-batches 4
        [ -f "$run/eval_speech_mixed_judge.json" ] || $M eval --ckpt "$run" --suite speech --n 163 \
            --val-batches 0 --judge $MIXED_JUDGE --out "$run/eval_speech_mixed_judge.json"
    done
}

"$@"
