#!/usr/bin/env bash
# The runs behind docs/RESULTS.md, "The demo recipe": screening at 500 steps, full-length variants,
# three seeds, the 700-step screening of latents and batch size, demo-long, and the n = 256
# evaluations. Each `motfusion demo` trains (or resumes, or
# reuses a finished run) and writes RUN/report/metrics.json; benchmarks/demo_table.py makes the
# tables. The screening rows were run with the recipe of their time (the demo recipe then was
# `small`); the overrides below reproduce them on top of today's demo recipe. OLD is what the rows of
# screen, full and seeds had that today's recipe does not: no grid positions, 1,100 steps, captions
# that state positions half the time (PREV, which the grid and levers rows add), and fp32 on every
# CPU (FP32: before train.precision=auto, which trains in bf16 where the CPU has AMX).
#   benchmarks/demo_sweep.sh screen | screen2 | local | heads | rope2d | muon | guidance | full | seeds | grid | levers | long | long_muon | guidance_muon | size08 | depth | muon_convs | best_of | mix | cfg_dropout | loss_lr | object_gap | batch_ema | flow_shift | best_of8 | eval
set -euo pipefail
M=${MOTFUSION:-.venv/bin/motfusion}
R=${RUNS:-runs/sweep}
# Every row was sampled at guidance 3, the recipe's objective.guidance before it took 8, and trained
# the U-Net's convolutions with AdamW, as the recipe did before train.muon_convs (rows turn it on).
demo() {
    local name=$1 steps=$2; shift 2
    $M demo --out "$R/$name" --steps "$steps" --n-eval 64 train.tensorboard=false objective.guidance=3 \
        train.muon_convs=false "$@"
}
# A run of STEPS (make demo's are 1,400), then its evaluation at n = 256; a run that fails is skipped.
full256() {
    local name=$1 steps=$2; shift 2
    if demo "$name" "$steps" "$@"; then
        $M eval --ckpt "$R/$name" --n 256 --val-batches 2 --out "$R/$name/eval_n256.json"
    fi
}
FP32="train.precision=fp32"                        # the recipe before train.precision=auto
PREV="data.caption_position_prob=0.5 $FP32"         # ... and before descriptive captions
OLD="model.grid_pos=false $PREV"
LINEAR="$OLD model.patcher=linear model.unet_pooled=false data.caption_first_prob=0.8"
UNET="$OLD data.caption_first_prob=0.8 train.ema=0.99"

screen() {
    demo s_lin8w 500 $LINEAR model.patch_size=8 train.ema=0
    demo s_lin4w_ema 500 $LINEAR model.patch_size=4 train.ema=0.99
    demo s_lin4w_ln 500 $LINEAR model.patch_size=4 train.ema=0.99 objective.flow_timesteps=logit_normal
    demo s_lin4w_ln_c50 500 $LINEAR model.patch_size=4 train.ema=0.99 objective.flow_timesteps=logit_normal data.caption_first_prob=0.5
    demo s_unet8w 500 $UNET model.unet_pooled=false train.ema=0
    demo s_unet8w_pool 500 $UNET
}

full() {
    demo f_cap80 1100 $OLD data.caption_first_prob=0.8
    demo f_ln 1100 $OLD data.caption_first_prob=0.8 objective.flow_timesteps=logit_normal
    demo f_cap60 1100 $OLD data.caption_first_prob=0.6
    demo f_cap70 1100 $OLD                              # the demo recipe of its time, seed 0
    demo f_cap70_ln 1100 $OLD objective.flow_timesteps=logit_normal
}

seeds() {  # the recipes of their time (seed 0: f_cap70; make demo's) and today's (seed 0: runs/demo)
    demo seed1 1100 $OLD train.seed=1
    demo seed2 1100 $OLD train.seed=2
    demo demo_seed1 1400 train.seed=1 $FP32
    demo demo_seed2 1400 train.seed=2 $FP32
    demo bf16_1400_seed1 1400 train.seed=1
    demo bf16_1400_seed2 1400 train.seed=2
    demo bf16_seed1 2000 train.seed=1   # more steps than fit in the 15 minutes on a slow day
    demo bf16_seed2 2000 train.seed=2
    demo bf16_1500_seed0 1500           # make demo at 1,500 steps (15 min 14 s from a fresh clone)
}

grid() {  # equal training time: steps scaled by each setting's step time alone (711 ms at patch 8)
    demo p4 1950 $OLD model.patch_size=4             # 400 ms per step, 32 images per step instead of ~90
    demo L8 980 $OLD model.n_layers=8                # 796 ms
    demo pos 1100 $PREV  # model.grid_pos (now the default)
    demo p4pos 1950 model.patch_size=4 $PREV
    demo pos_b4 2200 train.batch_size=4 $PREV
    demo pos_cap60 1100 data.caption_first_prob=0.6 $PREV
    demo w8 1770 model.unet_channels=8 $PREV  # 563 ms per step: as much training time as make demo
}

levers() {  # 1,400 steps each, on the recipe with grid positions (make demo's of its time)
    demo lr4 1400 train.lr=4e-3 $PREV
    demo lr1 1400 train.lr=1e-3 train.min_lr=5e-5 $PREV
    demo fold2 2030 model.unet_fold=2 $PREV  # 0.69 of the step time; stopped at step 1,060
    demo detail 1400 data.caption_size_prob=1.0 data.caption_position_prob=1.0 $FP32
    demo detail08 1400 data.caption_size_prob=0.8 data.caption_position_prob=0.8 $FP32
    demo detail08_ilw15 1400 data.caption_size_prob=0.8 data.caption_position_prob=0.8 objective.image_loss_weight=15 $FP32
    demo pos1 1400 data.caption_position_prob=1.0 $FP32
    demo pos1_ilw15 1400 data.caption_position_prob=1.0 objective.image_loss_weight=15 $FP32
    demo size08_s0 1400 data.caption_size_prob=0.8 $FP32
    demo size08_s1 1400 data.caption_size_prob=0.8 train.seed=1 $FP32
}

screen2() {  # 700 steps each on today's recipe; xpred700 was a one-off patch (docs/RESULTS.md), not listed
    demo pix700 700
    [ -f "$R/vae-shapes-2k/weights.safetensors" ] || $M train-vae --dataset shapes --out "$R/vae-shapes-2k" steps=2000
    demo lat700 700 data.image_repr=latents model.vae="$R/vae-shapes-2k" model.patch_size=2
    demo b16_350 350 train.batch_size=16
}

local_cond() {  # model.unet_local: each patch's hidden state conditions the up blocks over its own pixels
    full256 local 1400 model.unet_local=true
    full256 localonly 1400 model.unet_local=true model.unet_pooled=false
}

heads() {  # at the recipe's guidance 8: 8 heads of 16 instead of 4 of 32 (same FLOPs), 70% scenes of 2-3 objects
    local G8="objective.guidance=8"
    full256 heads8 1400 model.n_heads=8 $G8
    full256 heads8_seed1 1400 model.n_heads=8 train.seed=1 $G8
    full256 heads8_seed2 1400 model.n_heads=8 train.seed=2 $G8
    full256 multi70 1400 data.single_object_prob=0.3 $G8
}

rope2d() {  # at the recipe's guidance 8: 2D rotary positions for the image tokens (model.rope_2d); n = 64 only
    demo rope2d_seed0 1400 model.rope_2d=true train.seed=0 objective.guidance=8
    demo rope2d_seed1 1400 model.rope_2d=true train.seed=1 objective.guidance=8
}

muon() {  # at the recipe's guidance 8: Muon on the backbone's matrices (train.optimizer=muon), seeds 0-2,
    # a learning rate of 3e-3, and 25% captioning documents instead of 30% (seeds 0-2)
    local MUON="train.optimizer=muon objective.guidance=8" CAP25="data.caption_first_prob=0.75"
    full256 muon_seed0 1400 train.seed=0 $MUON
    full256 muon_seed1 1400 train.seed=1 $MUON
    full256 muon_seed2 1400 train.seed=2 $MUON
    full256 muon_lr3 1400 train.lr=3e-3 $MUON
    full256 muon_cap25_seed0 1400 $CAP25 $MUON
    full256 muon_cap25_seed1 1400 $CAP25 train.seed=1 $MUON
    full256 muon_cap25_seed2 1400 $CAP25 train.seed=2 $MUON
}

guidance() {  # the make-demo model (runs/demo) and the bf16 seeds sampled at other guidance scales
    mkdir -p "$R/guidance"
    for g in 2 3 5 8 12 16; do
        $M eval --ckpt runs/demo --n 128 --val-batches 0 --guidance $g --out "$R/guidance/demo_g$g.json"
    done
    for run in runs/demo "$R/bf16_1400_seed1" "$R/bf16_1400_seed2" "$R/demo-long-adamw"; do
        $M eval --ckpt "$run" --n 256 --val-batches 0 --guidance 8 --out "$R/guidance/$(basename "$run")_g8_n256.json"
    done
    for steps in 25 100; do  # Euler steps at guidance 8 (the recipe's scale now)
        $M eval --ckpt runs/demo --n 256 --val-batches 0 --guidance 8 --steps $steps --out "$R/guidance/demo_s$steps.json"
    done
}

long() {  # today's demo-long (n = 64 in its report, then 256 at its guidance 8 and at 3), the AdamW
    # one of before (demo-long-adamw, guidance 3) and the one before that (demo-long-v1)
    local ADAMW="train.optimizer=adamw data.caption_first_prob=0.7 data.caption_size_prob=0.5 objective.guidance=3"
    $M demo --recipe demo-long --out "$R/demo-long" train.tensorboard=false
    [ -f "$R/demo-long/eval_n256.json" ] || $M eval --ckpt "$R/demo-long" --n 256 --out "$R/demo-long/eval_n256.json"
    [ -f "$R/demo-long/eval_n256_g3.json" ] || $M eval --ckpt "$R/demo-long" --n 256 --guidance 3 \
        --out "$R/demo-long/eval_n256_g3.json"
    $M demo --recipe demo-long --out "$R/demo-long-adamw" train.tensorboard=false $ADAMW
    [ -f "$R/demo-long-adamw/eval_n256.json" ] || $M eval --ckpt "$R/demo-long-adamw" --n 256 \
        --out "$R/demo-long-adamw/eval_n256.json"
    $M demo --recipe demo-long --out "$R/demo-long-v1" --n-eval 256 train.tensorboard=false $ADAMW $PREV
}

depth() {  # make demo's recipe (Muon, guidance 8) with 6 and 8 layers, steps cut to its training time
    full256 L6_muon 1220 model.n_layers=6 objective.guidance=8   # 1.15x make demo's step time, alone
    full256 L8_muon 1080 model.n_layers=8 objective.guidance=8   # about 1.3x
}

muon_convs() {  # the recipe with Muon for the U-Net's conv filters too (train.muon_convs: today's), seeds 0-2
    local seed
    for seed in 0 1 2; do
        full256 "mconv_seed$seed" 1400 objective.guidance=8 train.muon_convs=true train.seed=$seed
    done
}

best_of() {  # the muon_convs seeds sampled at 25 Euler steps, as the best of 1, 4 and 8 (objective.best_of)
    local seed k
    for seed in 0 1 2; do
        for k in 1 4 8; do
            $M eval --ckpt "$R/mconv_seed$seed" --n 256 --val-batches 0 --steps 25 --best-of $k \
                --out "$R/mconv_seed$seed/eval_n256_best${k}_s25.json"
        done
    done
}

mix() {  # today's recipe with 20% captioning documents, and with 60% of scenes of two or three objects
    full256 cap20 1400 objective.guidance=8 train.muon_convs=true data.caption_first_prob=0.8
    full256 single40 1400 objective.guidance=8 train.muon_convs=true data.single_object_prob=0.4
}

size08() {  # today's recipe (Muon, 25% captioning) with sizes stated in 80% of the captions, seeds 0-2
    local seed
    for seed in 0 1 2; do
        full256 "cap25_size08_seed$seed" 1400 objective.guidance=8 data.caption_size_prob=0.8 train.seed=$seed
    done
}

guidance_muon() {  # runs/demo as make demo of its time made it (Muon, 25% captioning, sizes in half the captions) at guidance 5 and 12
    mkdir -p "$R/guidance"
    for g in 5 12; do
        $M eval --ckpt runs/demo --n 256 --val-batches 0 --guidance $g --out "$R/guidance/demo_cap25_g$g.json"
    done
}

long_muon() {  # the first demo-long with Muon and 25% captioning documents: sizes in half the captions; n = 256
    $M demo --recipe demo-long --out "$R/demo-long-muon" train.tensorboard=false data.caption_size_prob=0.5 objective.guidance=3
    $M eval --ckpt "$R/demo-long-muon" --n 256 --val-batches 2 --guidance 3 --out "$R/demo-long-muon/eval_n256_g3.json"
}

cfg_dropout() {  # today's recipe with the caption dropped from 5%, 20% and 30% of images (objective.cfg_dropout; 10% before), and 20% with 28% captioning
    full256 cfgdrop05 1400 objective.guidance=8 train.muon_convs=true objective.cfg_dropout=0.05
    full256 cfgdrop20 1400 objective.guidance=8 train.muon_convs=true objective.cfg_dropout=0.2
    full256 cfgdrop30 1400 objective.guidance=8 train.muon_convs=true objective.cfg_dropout=0.3
    full256 cfgdrop20_seed1 1400 objective.guidance=8 train.muon_convs=true objective.cfg_dropout=0.2 train.seed=1
    local seed  # 20% with 28% captioning documents instead of 25%
    for seed in 0 1; do
        full256 "cfg20cap28$([ $seed = 0 ] || echo _seed$seed)" 1400 objective.guidance=8 train.muon_convs=true \
            objective.cfg_dropout=0.2 data.caption_first_prob=0.72 train.seed=$seed
    done
}
loss_lr() {  # today's recipe with image loss weight 10 (5 before), and a cosine to 6e-4 (1e-4 before)
    full256 ilw10 1400 objective.guidance=8 train.muon_convs=true objective.image_loss_weight=10
    full256 minlr6 1400 objective.guidance=8 train.muon_convs=true train.min_lr=6e-4
}
object_gap() {  # 4 free pixels between objects' boxes (data.object_gap; 2 before: the recipe now), seeds 0-2;
    # 5 pixels, seed 0; the best of 8 on the three seeds; 4 pixels with 15% caption dropout
    local seed
    for seed in 0 1 2; do
        full256 "gap4_seed$seed" 1400 objective.guidance=8 train.muon_convs=true data.object_gap=4 train.seed=$seed
        $M eval --ckpt "$R/gap4_seed$seed" --n 256 --val-batches 0 --best-of 8 --out "$R/gap4_seed$seed/eval_n256_best8.json"
    done
    full256 gap5_seed0 1400 objective.guidance=8 train.muon_convs=true data.object_gap=5
    full256 gap4_cfg15 1400 objective.guidance=8 train.muon_convs=true data.object_gap=4 objective.cfg_dropout=0.15
}
batch_ema() {  # today's recipe (objects 4 pixels apart) at equal training time with a smaller batch,
    # the moving average spanning as many tokens (a step of 6 rows takes 0.75 of 8's, of 4 rows 0.55:
    # 60 steps of each alone, two threads); a cosine to 6e-4; longer moving averages (train.ema 0.998
    # changes nothing under the warm-up of train.ema_warmup 10); positions in 80% of the captions; gap 4
    # seeds 0 and 1 without the average
    local g="objective.guidance=8 train.muon_convs=true data.object_gap=4"
    full256 b6 1850 $g train.batch_size=6 train.ema=0.99625
    full256 b4 2500 $g train.batch_size=4 train.ema=0.9975
    full256 ema998 1400 $g train.ema=0.998
    full256 minlr6g4 1400 $g train.min_lr=6e-4
    full256 ema997w2 1400 $g train.ema=0.997 train.ema_warmup=2
    full256 ema9985w2 1400 $g train.ema=0.9985 train.ema_warmup=2
    full256 pos08g4 1400 $g data.caption_position_prob=0.8   # alone, two threads
    local seed
    for seed in 0 1; do
        $M eval --ckpt "$R/gap4_seed$seed" --n 256 --val-batches 2 --raw-weights --out "$R/gap4_seed$seed/eval_n256_raw.json"
    done
}
flow_shift() {  # today's recipe with flow's training noise levels shifted toward noise (objective.flow_shift 2
    # and 3; 2 on seeds 1 and 2 too); no guidance over the first quarter (--guidance-early 1) on the gap 4
    # models, two draws; all at n = 1,024 with the recipe's sampling
    local g="objective.guidance=8 train.muon_convs=true" run seed
    for run in "3 0" "2 0" "2 1" "2 2"; do
        set -- $run
        demo "shift$1_seed$2" 1400 $g objective.flow_shift=$1 train.seed=$2
        $M eval --ckpt "$R/shift$1_seed$2" --n 1024 --val-batches 0 --out "$R/shift$1_seed$2/eval_n1024.json"
    done
    for seed in 0 1 2; do
        $M eval --ckpt "$R/gap4_seed$seed" --n 1024 --val-batches 0 --guidance-early 1 --out "$R/gap4_seed$seed/eval_n1024_early1.json"
    done
    for seed in 0 1; do
        $M eval --ckpt "$R/gap4_seed$seed" --n 1024 --val-batches 0 --guidance-early 1 --seed 1 \
            --out "$R/gap4_seed$seed/eval_n1024_s1_early1.json"
    done
}
best_of8() {  # the best of 8 drawn without guidance over the first quarter (the recipe now) against
    # the best of 4 at 3 there (the recipe before), on gap 4 seeds 1 and 2 and make demo's model
    # (runs/demo, seed 0), two draws of the latter, n = 1,024; and the best of 8 at 3 there. The two
    # mixtures of early scales in docs/RESULTS.md were a one-off patch of Generator._best_of.
    local run
    for run in "$R/gap4_seed1" "$R/gap4_seed2" runs/demo; do
        $M eval --ckpt "$run" --n 1024 --val-batches 0 --best-of 4 --guidance-early 3 --out "$run/eval_n1024_b4e3.json"
        $M eval --ckpt "$run" --n 1024 --val-batches 0 --best-of 8 --guidance-early 1 --out "$run/eval_n1024_b8e1.json"
    done
    $M eval --ckpt runs/demo --n 1024 --val-batches 0 --best-of 8 --guidance-early 3 --out runs/demo/eval_n1024_b8e3.json
    for run in "4 3" "8 1"; do
        set -- $run
        $M eval --ckpt runs/demo --n 1024 --val-batches 0 --best-of $1 --guidance-early $2 --seed 1 \
            --out "runs/demo/eval_n1024_s1_b$1e$2.json"
    done
}
evaluate() {  # n = 256 for the demo recipe's seeds; --raw-weights: the same run without the moving average
    for run in f_cap70 seed1 seed2 demo_seed1 demo_seed2 bf16_1400_seed1 bf16_1400_seed2 bf16_seed1 bf16_seed2 bf16_1500_seed0 detail detail08 detail08_ilw15 pos1 pos1_ilw15 size08_s0 size08_s1; do
        [ -f "$R/$run/eval_n256.json" ] || $M eval --ckpt "$R/$run" --n 256 --val-batches 2 --out "$R/$run/eval_n256.json"
    done
    [ -f "$R/f_cap70/eval_n256_raw.json" ] || $M eval --ckpt "$R/f_cap70" --n 256 --val-batches 2 --raw-weights \
        --out "$R/f_cap70/eval_n256_raw.json"
}

case "${1:-}" in
    screen) screen ;; screen2) screen2 ;; local) local_cond ;; heads) heads ;; rope2d) rope2d ;; muon) muon ;; guidance) guidance ;; full) full ;; seeds) seeds ;; grid) grid ;; levers) levers ;; long) long ;; long_muon) long_muon ;; guidance_muon) guidance_muon ;; size08) size08 ;; depth) depth ;; muon_convs) muon_convs ;; best_of) best_of ;; mix) mix ;; cfg_dropout) cfg_dropout ;; loss_lr) loss_lr ;; object_gap) object_gap ;; batch_ema) batch_ema ;; flow_shift) flow_shift ;; best_of8) best_of8 ;; eval) evaluate ;;
    *) echo "usage: $0 screen|screen2|local|heads|rope2d|muon|guidance|full|seeds|grid|levers|long|long_muon|guidance_muon|size08|depth|muon_convs|best_of|mix|cfg_dropout|loss_lr|object_gap|batch_ema|flow_shift|best_of8|eval" >&2; exit 2 ;;
esac
