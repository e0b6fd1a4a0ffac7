#!/usr/bin/env bash
# The runs behind docs/RESULTS.md, "speech-demo": the speech pieces (data, codecs and decoders for
# k = 50, 100, 200, the judge), the screening runs (1,500 steps, one thread each, two or three side
# by side), the recipe's seeds, and their evaluation on every held-out utterance, read by the
# recipe's own judge and by the judge of the mixed-English data (runs/speech-data/asr-judge,
# "Intelligibility"). `make speech-demo` (a fresh clone) makes runs/speech-shapes as `pieces` does.
#   benchmarks/speech_sweep.sh pieces | screen | seeds | eval
set -euo pipefail
M=${MOTFUSION:-.venv/bin/motfusion}
R=${RUNS:-runs/spw}
D=runs/speech-shapes
MIXED_JUDGE=runs/speech-data/asr-judge
train() { local name=$1; shift; $M train --recipe speech-demo --out "$R/$name" train.tensorboard=false "$@"; }
K200="data.dataset=speech:$D/tokenizer-k200 model.vocab_sizes=speech:200"

pieces() {
    [ -f $D/dataset.json ] || $M make-speech-data --out $D --n 3000 --sources shapes
    [ -d $D/asr-judge ] || $M train-asr-judge --data $D --steps 800
    for k in 50 100 200; do
        codec=$D/tokenizer-k$k
        [ -d $codec ] || $M train-speech-tokenizer --data $D --k $k --out $codec
        [ -d $codec/decoder ] || $M train-unit-vocoder --data $D --codec $codec --steps 1000
        $M eval-speech-codec --data $D --codec $codec --judge $MIXED_JUDGE --n 163
    done
    [ -d $D/tokenizer ] || cp -r $D/tokenizer-k100 $D/tokenizer  # the recipe's codec
}

screen() {
    local S="train.steps=1500"
    train base $S $K200 train.ema=0.995               # the first candidate: k=200, bytes, EMA
    train bpe $S $K200 data.tokenizer=bpe:512
    train noema $S $K200 train.ema=0
    train s3000 $K200 train.steps=3000
    train k100 $S data.dataset=speech:$D/tokenizer-k100
    train k50 $S data.dataset=speech:$D/tokenizer-k50 model.vocab_sizes=speech:50
}

seeds() {  # seed 0 is `make speech-demo` (runs/speech-demo)
    train seed1 train.seed=1
    train seed2 train.seed=2
}

eval() {
    for run in "$R"/*/ runs/speech-demo/; do
        run=${run%/}
        [ -f "$run/eval_speech.json" ] || $M eval --ckpt "$run" --suite speech --n 163 --val-batches 4
        [ -f "$run/eval_speech_mixed_judge.json" ] || $M eval --ckpt "$run" --suite speech --n 163 \
            --val-batches 0 --judge $MIXED_JUDGE --out "$run/eval_speech_mixed_judge.json"
    done
}

"$@"
