"""Named recipes: from `debug` (trains in seconds on a CPU, drives the tests) to the papers' sizes.

`get_recipe(name)` returns a validated Config; `motfusion train --recipe NAME` starts from it.
"""

from __future__ import annotations

from collections.abc import Callable

from motfusion.config import (
    Config,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
)
from motfusion.errors import ConfigError

RECIPES: dict[str, Callable[[], Config]] = {}

SPEECH_DEMO_DATA = "runs/speech-shapes"  # what `motfusion demo --recipe speech-demo` makes and reads


def recipe(name: str) -> Callable[[Callable[[], Config]], Callable[[], Config]]:
    def register(fn: Callable[[], Config]) -> Callable[[], Config]:
        RECIPES[name] = fn
        return fn

    return register


def get_recipe(name: str) -> Config:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    cfg = RECIPES[name]()
    cfg.recipe = name
    return cfg.validate()


@recipe("debug")
def debug() -> Config:
    """Seconds on a CPU: drives the tests."""
    return Config(
        model=ModelConfig(dim=64, n_layers=2, n_heads=4),
        data=DataConfig(image_size=16),
        train=TrainConfig(steps=20, batch_size=4, seq_len=192, lr=1e-3, warmup=5, log_every=5),
    )


@recipe("small")
def small() -> Config:
    """The base of the speech, Chameleon and Fashion-MNIST recipes and of the studies in
    docs/RESULTS.md (the demo recipe before its sweep): 1.8M parameters, 16px scenes as linear 4x4
    patches, byte-level text, 2000 steps, about 8 minutes on 2 cores. Without grid positions, as
    when the figures of docs/RESULTS.md built on it were measured."""
    return Config(
        model=ModelConfig(dim=128, n_layers=4, n_heads=4, grid_pos=False),
        objective=ObjectiveConfig(diffusion="flow"),
        data=DataConfig(image_size=16),
        train=TrainConfig(
            steps=2000,
            batch_size=8,
            seq_len=320,
            lr=2e-3,
            min_lr=1e-4,
            warmup=50,
            log_every=20,
            checkpoint_every=500,
        ),
    )


@recipe("demo")
def demo() -> Config:
    """The default `motfusion demo`: about 15 minutes on a 2-core laptop CPU, set-up included.

    Chosen by the sweep in docs/RESULTS.md ("The demo recipe"), one lever at a time:
    - 32px scenes (at 16px circles, squares and triangles look alike) through the U-Net patcher at
      patch 8: 16 tokens per image, crisp objects. Its up blocks also read the image's mean hidden
      state (model.unet_pooled); without it the caption did not reach the pixels' colors.
    - Image tokens know their row and column (model.grid_pos, the default): single-object shape
      0.55 -> 0.91. A BPE trained on the captions (data.tokenizer=bpe:512), sampling from the
      weights' moving average (train.ema), rectified flow (DDPM still gave patch noise).
    - Captions state every clear position (data.caption_position_prob=1): stated positions right
      0.18 -> 0.66; and sizes in 80% of them (data.caption_size_prob=0.8): stated sizes 0.76 ->
      0.94, geneval_single 0.866 +- 0.020 -> 0.957 +- 0.007 over three seeds (n = 256), prompts
      that state no size still right.
    - Muon for the backbone's matrices (train.optimizer=muon), AdamW for the rest: caption_accuracy
      0.724 -> 0.829 over three seeds; its step costs 1.17 times AdamW's. With it, 25% captioning
      documents (not 30%) taught stated positions on every seed. Muon for the U-Net's conv filters
      too (train.muon_convs): geneval 0.497 +- 0.012 -> 0.533 +- 0.015 over three seeds, step 1.02-1.05x.
    - Objects in the training scenes at least 4 pixels apart (data.object_gap; 2 before): two objects
      of one color drawn close merged into one region. geneval 0.576 +- 0.022 -> 0.593 +- 0.002 over
      three seeds, the count clause of scenes of several objects 0.40 -> 0.51.
    - Guidance 8 at sampling (objective.guidance): single objects 0.749 against 0.689 at 3.
    - Text to image as the best of several candidates (objective.best_of): the model reads them back
      and keeps the one that gives the prompt the highest likelihood as its caption, compared a
      quarter of the way through 25 Euler steps (objective.sample_steps; 50 gave the same images).
      The best of 4 took geneval 0.533 +- 0.015 -> 0.576 +- 0.022 over three seeds.
    - Over that first quarter, where the layout forms, no guidance (objective.guidance_early=1):
      guidance there draws a copy of an asked-for object into an empty quadrant. At 3 there (with
      the best of 4) geneval went 0.582 -> 0.607 over three seeds (n = 1,024); at 1 the candidates
      draw the asked number of objects more often but bind colors less surely, so the recipe
      draws 8 of them, each half the cost (no unconditional rows): about the time of the best of 4
      at 3. Among 8 the reading finds candidates right in both: geneval 0.608 +- 0.010 -> 0.646 +-
      0.022 over three models (n = 1,024; +0.022 to +0.049 on each), single objects kept.
    - train.precision=auto: bf16 where the CPU has AMX (0.84 of fp32's step time), fp32 elsewhere.
    - 1,400 steps: what fits in the 15 minutes beside set-up and evaluation. Fresh clones took
      12 min 29 s to 14 min 59.8 s, by the stretch of the host (fp32, AMD without AMX); 13 min 58 s
      (bf16, AMX, before Muon).
    """
    return Config(
        model=ModelConfig(
            dim=128, n_layers=4, n_heads=4, patcher="unet", patch_size=8, unet_channels=16, unet_pooled=True
        ),
        objective=ObjectiveConfig(
            diffusion="flow", sample_steps=25, guidance=8.0, guidance_early=1.0, best_of=8
        ),
        data=DataConfig(
            image_size=32,
            tokenizer="bpe:512",
            caption_first_prob=0.75,
            caption_position_prob=1.0,
            caption_size_prob=0.8,
            object_gap=4,
        ),
        train=TrainConfig(
            steps=1400,
            batch_size=8,
            seq_len=320,
            lr=2e-3,
            min_lr=1e-4,
            warmup=50,
            log_every=20,
            checkpoint_every=250,
            ema=0.995,
            precision="auto",
            optimizer="muon",
            muon_convs=True,
        ),
    )


@recipe("demo-long")
def demo_long() -> Config:
    """The demo recipe trained for 5,000 steps instead of 1,400 (45 minutes in all on 2 CPU cores):
    how far the same setup goes. train.ema 0.999 is never reached: under the warm-up (train.ema_warmup
    10) the average spans about step / 9 steps, 556 at the end, as in the run measured. The U-Net's
    convolutions stay on AdamW (train.muon_convs off), objects 2 pixels apart (data.object_gap 0)
    and guidance 8 at every step (objective.guidance_early none) for the best of 4 candidates, as in
    the run that measured its figures."""
    cfg = demo()
    cfg.train.steps, cfg.train.warmup, cfg.train.checkpoint_every, cfg.train.ema = 5000, 100, 500, 0.999
    cfg.train.muon_convs, cfg.data.object_gap = False, 0
    cfg.objective.guidance_early, cfg.objective.best_of = None, 4
    return cfg


@recipe("demo-edit")
def demo_edit() -> Config:
    """Image editing (Transfusion 4.4): fine-tunes the `make demo` model (runs/demo) on shapes-edit
    triples, [BOI source EOI] instruction [BOI target EOI] with the source clean, a quarter of the
    documents still ordinary shapes ones so text to image and captioning stay. Weights come from
    runs/demo (train.init_from); optimizer (AdamW, as measured) and schedule start fresh. Sampled
    with 50 steps, guidance 3 at every step and one candidate per prompt (its measured figures). Its
    scenes keep objects 2 pixels apart (data.object_gap 0), as its edits place them."""
    cfg = demo()
    cfg.data.dataset, cfg.data.object_gap = "shapes-edit", 0
    cfg.objective.sample_steps, cfg.objective.guidance, cfg.objective.best_of = 50, 3.0, 1
    cfg.objective.guidance_early = None
    cfg.train.optimizer, cfg.train.muon_convs = "adamw", False
    cfg.train.init_from = "runs/demo"
    cfg.train.steps, cfg.train.lr, cfg.train.warmup = 1200, 1e-3, 50
    return cfg


@recipe("speech-demo")
def speech_demo() -> Config:
    """`motfusion demo --recipe speech-demo`: the shapes model of `small` with a third tower that
    speaks and listens. Speech of the shapes captions (espeak-ng, 6 voices, 3,000 utterances) as
    k=100 acoustic units, text->speech and speech->text documents mixed half and half with shapes
    text-image ones, sampled from the weights' moving average. `motfusion demo` first makes what it
    needs in runs/speech-shapes (the utterances, the unit codec and its decoder, the ASR judge) and
    keeps it there. Chosen by the sweep in docs/RESULTS.md ("speech-demo"): k=100 spoke better than
    200 (judge WER 0.08 against 0.14 at 1,500 steps) and resynthesizes as well (0.012 / 0.013)."""
    cfg = small()
    cfg.model.towers = {"text": "text", "image": "image", "speech": "speech"}
    cfg.model.vocab_sizes = {"speech": 100}
    cfg.data.dataset = f"speech:{SPEECH_DEMO_DATA}"
    cfg.train.ema = 0.995
    return cfg


@recipe("speech-mixed")
def speech_mixed() -> Config:
    """The demo model of its time (`small`) with a third tower, for speech units: text->speech and
    speech->text documents of mixed English (shapes captions, fortunes, the Bible, WordNet) mixed
    with shapes text-image ones; the base of the leave-one-modality-out study. Needs
    `motfusion make-speech-data --out runs/speech-data` and `motfusion train-speech-tokenizer --data
    runs/speech-data` first (k must match vocab_sizes)."""
    cfg = small()
    cfg.model.towers = {"text": "text", "image": "image", "speech": "speech"}
    cfg.model.vocab_sizes = {"speech": 500}
    cfg.data.dataset = "speech:runs/speech-data"
    return cfg


@recipe("chameleon-demo")
def chameleon_demo() -> Config:
    """The demo model in the Chameleon setting: each 32px image is 64 VQ codes (4x downsampling)
    between BOI and EOI, trained with the LM loss of its own head and sampled token by token. Needs
    `motfusion train-vq --dataset shapes --out runs/vq-shapes32` first (its codebook size must match)."""
    cfg = small()
    cfg.data.image_size = 32
    cfg.data.image_repr = "tokens"
    cfg.model.vq = "runs/vq-shapes32"
    cfg.model.vocab_sizes = {"image": 512}
    return cfg


@recipe("fashion")
def fashion() -> Config:
    """Transfusion on real images: Fashion-MNIST (32px) as 8x8x4 latents of a small KL-VAE, with the
    U-Net patcher at patch 2 (16 tokens per image), captions from the class names. Needs
    `motfusion train-vae --dataset fashion --out runs/vae-fashion` first."""
    cfg = small()
    cfg.data.dataset = "fashion"
    cfg.data.image_size = 32
    cfg.data.image_repr = "latents"
    cfg.model.vae = "runs/vae-fashion"
    cfg.model.image_channels = 4
    cfg.model.patcher = "unet"
    cfg.model.patch_size = 2
    return cfg


def _leave_one_out(shared: tuple[str, str]) -> Config:
    """MoT's leave-one-modality-out study: speech-mixed with two of its three modalities in one tower.
    Compare with speech-mixed itself (three towers) and with its dense model (model.untie=)."""
    cfg = speech_mixed()
    merged = "_".join(shared)
    cfg.model.towers = {m: merged if m in shared else tower for m, tower in cfg.model.towers.items()}
    return cfg


@recipe("loo-text-image")
def loo_text_image() -> Config:
    return _leave_one_out(("text", "image"))


@recipe("loo-text-speech")
def loo_text_speech() -> Config:
    return _leave_one_out(("text", "speech"))


@recipe("loo-image-speech")
def loo_image_speech() -> Config:
    return _leave_one_out(("image", "speech"))


def _paper(n_layers: int, dim: int, n_heads: int) -> Config:
    # The papers' transformer sizes and optimizer. Images: 64px with 4x4 patches = 256 tokens per image,
    # the paper's token count per image (it uses 256px through a VAE, which motfusion adds separately).
    return Config(
        model=ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, patch_size=4),
        data=DataConfig(image_size=64),
        train=TrainConfig(
            steps=250_000,
            batch_size=512,
            seq_len=4096,
            lr=3e-4,
            min_lr=1.5e-5,
            warmup=4000,
            checkpoint_every=1000,
            log_every=10,
        ),
    )


@recipe("163m")
def r_163m() -> Config:
    return _paper(16, 768, 12)


@recipe("760m")
def r_760m() -> Config:
    return _paper(24, 1536, 24)


@recipe("1.4b")
def r_1_4b() -> Config:
    return _paper(24, 2048, 16)


@recipe("7b")
def r_7b() -> Config:
    return _paper(32, 4096, 32)
