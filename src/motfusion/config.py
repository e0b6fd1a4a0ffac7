"""Typed configuration: one keyword-only dataclass per component, dotted overrides (recipes.py: named ones).

A run is fully described by `Config`; `Config.to_dict()` is what gets written to DIR/config.json and
`Config.from_dict()` reads it back. Command-line overrides look like `model.untie=ffn,attn`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from motfusion.errors import ConfigError

UNTIE_CHOICES = ("ffn", "attn", "norm")
TRAINED_TOKENIZER = re.compile(
    r"bpe:(\d+)"
)  # data.tokenizer=bpe:N: a BPE trained with the run (tokenizer.py)


@dataclass(kw_only=True)
class ModelConfig:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 0  # 0: Llama's 8/3 * dim, rounded up to a multiple of 64
    # Which components get separate weights per tower: any subset of {ffn, attn, norm}. Empty = dense.
    untie: tuple[str, ...] = UNTIE_CHOICES
    # Modality -> tower name. Modalities that share a name share weights (the MoT leave-one-out study).
    towers: dict[str, str] = field(default_factory=lambda: {"text": "text", "image": "image"})
    image_attention: str = "bidirectional"  # or "causal" (Transfusion's ablation)
    attention_backend: str = "auto"  # auto: flex on CUDA, documents elsewhere; sdpa: the dense-mask reference
    patch_size: int = 4
    patcher: str = "linear"  # or "unet": Transfusion's U-Net down/up blocks around the backbone
    unet_channels: int = 32  # the U-Net's width at full resolution (doubles per level, up to 4x)
    unet_blocks: int = 1  # residual blocks per resolution, in each of the down and up paths
    unet_pooled: bool = False  # the image's mean hidden state conditions every up block (with the timestep)
    unet_local: bool = False  # each patch's hidden state conditions the up blocks over that patch's pixels
    unet_fold: int = 1  # f > 1: f x f pixels folded into channels first; the U-Net starts at 1/f resolution
    # A fixed 2D sin-cos embedding of each patch's row and column, added to the image tokens (DiT). Saved
    # configs from before it existed load with False (Config.from_dict), so their weights mean the same.
    grid_pos: bool = True
    # 2D rotary positions for image tokens (M-RoPE without its time axis): half the frequency pairs turn
    # with the patch's row, half with its column, both counted from the image's first position; text
    # keeps its 1D positions on both halves. Continuous images only (VQ codes stay a 1D sequence).
    rope_2d: bool = False
    image_channels: int = 3
    vae: str = (
        ""  # with data.image_repr=latents: a motfusion train-vae directory or a diffusers AutoencoderKL one
    )
    vq: str = ""  # with data.image_repr=tokens: a motfusion train-vq directory (the image tokenizer)
    # Vocabulary size of each discrete modality besides text (text's is the tokenizer's), e.g. image:512
    # (VQ codes: the Chameleon setting) or speech:500. Each gets its own embedding table and head.
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    text_moe_experts: int = 0  # > 0: the FFN that serves text is a mixture of experts (MoT's hybrid)
    moe_top_k: int = 1  # experts per text token
    align_dim: int = 0  # > 0: image and text projections to this size, for objective.contrastive_weight
    qk_norm: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or 64 * -(-(8 * self.dim // 3) // 64)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        _check_types(self, "model")
        _check(
            self.ffn_dim >= 0 and self.image_channels > 0 and self.align_dim >= 0,
            "model.ffn_dim and model.align_dim must be >= 0 and model.image_channels positive",
        )
        _check(
            self.rope_theta > 0 and self.norm_eps > 0, "model.rope_theta and model.norm_eps must be positive"
        )
        _check(
            self.dim > 0 and self.n_layers > 0 and self.n_heads > 0,
            "model.dim, model.n_layers and model.n_heads must be positive",
        )
        _check(
            self.dim % self.n_heads == 0,
            f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}",
        )
        _check(
            not self.grid_pos or self.dim % 4 == 0,
            f"model.dim={self.dim} must be divisible by 4 for model.grid_pos (or set model.grid_pos=false)",
        )
        _check(self.head_dim % 2 == 0, f"model.dim / model.n_heads = {self.head_dim} must be even for RoPE")
        bad = sorted(set(self.untie) - set(UNTIE_CHOICES))
        _check(
            not bad, f"model.untie: unknown component(s) {bad}; choose any subset of {list(UNTIE_CHOICES)}"
        )
        _check(
            self.image_attention in ("bidirectional", "causal"),
            f"model.image_attention={self.image_attention!r}: choose 'bidirectional' or 'causal'",
        )
        _check(
            self.attention_backend in ("auto", "sdpa", "flex", "documents"),
            f"model.attention_backend={self.attention_backend!r}: choose 'auto', 'sdpa', 'flex' or 'documents'",
        )
        _check(self.patch_size > 0, "model.patch_size must be positive")
        _check(
            self.patcher in ("linear", "unet"), f"model.patcher={self.patcher!r}: choose 'linear' or 'unet'"
        )
        if self.patcher == "unet":
            _check(
                self.patch_size & (self.patch_size - 1) == 0,
                f"model.patch_size={self.patch_size} must be a power of 2 with model.patcher=unet",
            )
            _check(
                self.unet_channels > 0 and self.unet_blocks > 0,
                "model.unet_channels and model.unet_blocks must be positive",
            )
            _check(
                self.unet_fold > 0
                and self.unet_fold & (self.unet_fold - 1) == 0
                and self.unet_fold <= self.patch_size,
                f"model.unet_fold={self.unet_fold} must be a power of 2 up to model.patch_size={self.patch_size}",
            )
        _check("text" in self.towers, "model.towers must map the 'text' modality to a tower")
        _check(
            "text" not in self.vocab_sizes and all(n > 0 for n in self.vocab_sizes.values()),
            "model.vocab_sizes: positive sizes for the discrete modalities other than text (text's is the tokenizer's)",
        )
        untowered = sorted(set(self.vocab_sizes) - set(self.towers))
        _check(
            not untowered,
            f"model.towers must map {untowered} to a tower, e.g. model.towers=text:text,image:image,speech:speech",
        )
        _check(self.text_moe_experts >= 0, "model.text_moe_experts must be >= 0 (0: no mixture of experts)")
        _check(
            not self.text_moe_experts or 1 <= self.moe_top_k <= self.text_moe_experts,
            f"model.moe_top_k={self.moe_top_k} must be between 1 and model.text_moe_experts={self.text_moe_experts}",
        )


@dataclass(kw_only=True)
class ObjectiveConfig:
    image_loss_weight: float = 5.0  # lambda in L = L_LM + lambda * L_diffusion
    diffusion: str = "ddpm"  # ddpm (epsilon, cosine schedule) or flow (rectified flow, velocity)
    num_timesteps: int = 1000
    flow_timesteps: str = "uniform"  # flow's training noise levels: uniform, or logit_normal (SD3)
    # > 1: those levels shifted toward noise, s -> shift s / (1 + (shift - 1) s) (SD3's timestep shift)
    flow_shift: float = 1.0
    cfg_dropout: float = 0.1  # probability of dropping an image's caption (classifier-free guidance)
    # How the model is sampled where a command gives nothing else (SampleConfig): a recipe keeps the
    # settings measured best for its model. Denoising steps, guidance scale, text-to-image candidates.
    sample_steps: int = 50
    guidance: float = 3.0
    # The scale over the denoising steps up to best_of's comparison (the first quarter), where a
    # sample's layout forms; None: `guidance` throughout.
    guidance_early: float | None = None
    best_of: int = 1
    image_first_noise_cap: int | None = 500  # max timestep of an image that precedes its caption
    loss_weights: dict[str, float] = field(default_factory=dict)  # per discrete modality's LM loss; default 1
    moe_balance_weight: float = 0.01  # Switch's load-balancing loss, with model.text_moe_experts
    contrastive_weight: float = 0.0  # > 0: + w * InfoNCE between each image and its document's text

    def validate(self) -> None:
        _check_types(self, "objective")
        _check(self.num_timesteps > 0, "objective.num_timesteps must be positive")
        _check(
            self.diffusion in ("ddpm", "flow"),
            f"objective.diffusion={self.diffusion!r}: choose 'ddpm' or 'flow'",
        )
        _check(
            self.flow_timesteps in ("uniform", "logit_normal"),
            f"objective.flow_timesteps={self.flow_timesteps!r}: choose 'uniform' or 'logit_normal'",
        )
        _check(
            math.isfinite(self.flow_shift) and self.flow_shift > 0,
            f"objective.flow_shift={self.flow_shift} must be a positive number (1 = no shift)",
        )
        _check(
            self.diffusion == "flow" or self.flow_shift == 1.0,
            f"objective.flow_shift={self.flow_shift} shifts flow's noise levels: use it with objective.diffusion=flow",
        )
        _check(0.0 <= self.cfg_dropout < 1.0, "objective.cfg_dropout must be in [0, 1)")
        for name in ("guidance", "guidance_early"):
            scale = getattr(self, name)
            _check(
                scale is None or math.isfinite(scale), f"objective.{name}={scale} must be finite (1 = off)"
            )
        _check(
            self.best_of >= 1 and self.sample_steps >= 1,
            f"objective.best_of={self.best_of} and objective.sample_steps={self.sample_steps} must be >= 1",
        )
        _check(self.image_loss_weight >= 0, "objective.image_loss_weight must be >= 0")
        _check(
            all(w >= 0 for w in self.loss_weights.values()) and self.moe_balance_weight >= 0,
            "objective.loss_weights and objective.moe_balance_weight must be >= 0",
        )
        _check(self.contrastive_weight >= 0, "objective.contrastive_weight must be >= 0")
        cap = self.image_first_noise_cap
        _check(
            cap is None or 0 < cap <= self.num_timesteps,
            f"objective.image_first_noise_cap must be in (0, {self.num_timesteps}] or none",
        )


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "shapes"
    image_size: int = 32
    image_repr: str = (
        "pixels"  # or "latents": images encoded by the frozen VAE in model.vae; or "tokens": VQ codes
    )
    tokenizer: str = (
        "bytes"  # bytes; bpe:N (trained with the run on its text, see tokenizer.py); or a BPE json path
    )
    caption_first_prob: float = 0.8  # else the image comes first (captioning)
    max_objects: int = 3
    single_object_prob: float = 0.5
    # shapes: the chance that a caption states an object's size, and its position where one is clear.
    # The evaluation's prompts and captions keep 0.5 (evaluation/shapes_suite.py).
    caption_size_prob: float = 0.5
    caption_position_prob: float = 0.5
    object_gap: int = 0  # shapes: pixels kept free between two objects' boxes; 0: image_size / 16
    # User data (manifest:PATH, folder:PATH): checked once before training, see data/user.py.
    on_bad_sample: str = "error"  # error: stop naming the first bad file; skip: train on the rest
    val_fraction: float = 0.05  # share of samples held out for val, chosen by a hash of each sample
    min_image_size: int = 0  # shorter image side in pixels; 0: data.image_size (no upscaling)
    max_image_pixels: int = 50_000_000  # larger images are rejected before they are decoded
    # data.dataset=speech:DIR (data/speech.py): text->speech and speech->text, with shapes mixed in.
    speech_text_first_prob: float = 0.5  # a speech document is text->speech, else speech->text
    speech_shapes_share: float = 0.5  # share of shapes text-image documents in the speech dataset
    # data.dataset=shapes-edit (data/edits.py): editing triples, with ordinary shapes documents mixed in.
    edit_share: float = 0.75  # share of editing documents
    edit_layout: str = "source-first"  # [BOI source EOI] instruction [BOI target EOI]; or instruction-first

    def validate(self) -> None:
        _check_types(self, "data")
        _check(self.max_objects > 0, "data.max_objects must be positive")
        _check(0.0 <= self.single_object_prob <= 1.0, "data.single_object_prob must be in [0, 1]")
        _check(self.object_gap >= 0, "data.object_gap must be >= 0 (0: image_size / 16)")
        for key in ("caption_size_prob", "caption_position_prob"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"data.{key} must be in [0, 1]")
        _check(
            bool(self.dataset), "data.dataset must name a dataset, e.g. shapes"
        )  # resolved in data.pipeline
        bpe = TRAINED_TOKENIZER.fullmatch(self.tokenizer)
        _check(
            not self.tokenizer.startswith("bpe:") or (bpe is not None and int(bpe.group(1)) > 272),
            f"data.tokenizer={self.tokenizer!r}: bpe:N needs N > 272 (256 bytes and 16 specials), e.g. bpe:512",
        )
        _check(self.image_size >= 8, "data.image_size must be >= 8")
        _check(
            self.image_repr in ("pixels", "latents", "tokens"),
            f"data.image_repr={self.image_repr!r}: choose 'pixels', 'latents' or 'tokens'",
        )
        _check(0.0 <= self.caption_first_prob <= 1.0, "data.caption_first_prob must be in [0, 1]")
        _check(
            self.on_bad_sample in ("error", "skip"),
            f"data.on_bad_sample={self.on_bad_sample!r}: choose 'error' or 'skip'",
        )
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
        _check(
            self.min_image_size >= 0 and self.max_image_pixels > 0,
            "data.min_image_size must be >= 0 and data.max_image_pixels positive",
        )
        _check(
            0.0 <= self.speech_text_first_prob <= 1.0 and 0.0 <= self.speech_shapes_share < 1.0,
            "data.speech_text_first_prob must be in [0, 1] and data.speech_shapes_share in [0, 1)",
        )
        _check(0.0 <= self.edit_share <= 1.0, "data.edit_share must be in [0, 1]")
        _check(
            self.edit_layout in ("source-first", "instruction-first"),
            f"data.edit_layout={self.edit_layout!r}: choose 'source-first' or 'instruction-first'",
        )


@dataclass(kw_only=True)
class TrackingConfig:
    """Where a training run's numbers go besides RUN/metrics.jsonl: the keys every trainer shares (the
    main one as train.KEY, each auxiliary model's config as KEY), read by training/logging.py."""

    tensorboard: bool = False  # event files in the run (or artifact) directory
    wandb: bool = False  # a Weights & Biases run; WANDB_MODE=offline keeps it on disk (`wandb sync` later)
    wandb_project: str = "motfusion"
    wandb_run: str = ""  # the run's display name; empty: the name of the run directory
    key_prefix: ClassVar[str] = ""  # how messages name the keys: "train." for TrainConfig

    def check_tracking(self) -> None:
        _check(
            bool(self.wandb_project.strip()) and "/" not in self.wandb_project,
            f"{self.key_prefix}wandb_project={self.wandb_project!r} must be a project name without '/', e.g. motfusion",
        )


@dataclass(kw_only=True)
class TrainConfig(TrackingConfig):
    key_prefix: ClassVar[str] = "train."
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-4
    min_lr: float = 1.5e-5
    warmup: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = (
        "adamw"  # or muon: Muon on the backbone's weight matrices, AdamW on the rest (training/muon.py)
    )
    # With optimizer=muon: Muon also steps the U-Net patcher's conv filters (as out x in*k*k matrices),
    # all but its stem and its zero-initialised output (docs/RESULTS.md, "Muon").
    muon_convs: bool = False
    grad_clip: float = 1.0
    ema: float = 0.0  # decay of the weights' moving average that sampling uses (0: none); training/ema.py
    # The decay at step s is min(ema, (1 + s) / (ema_warmup + s)): the average spans about
    # s / (ema_warmup - 1) steps until it reaches 1 / (1 - ema) (training/ema.py).
    ema_warmup: float = 10.0
    init_from: str = ""  # a run or checkpoint whose weights (not optimizer, not step) a new run starts from
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    log_every: int = 10
    device: str = "auto"  # auto: cuda if available, else cpu
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss or gradient
    tensorboard: bool = True  # event files beside metrics.jsonl (the other tracking keys: TrackingConfig)
    # Several processes (torchrun): batch_size is the GLOBAL batch, split evenly over the ranks.
    parallel: str = "auto"  # auto: ddp with several processes, none with one; or ddp, fsdp (FSDP2)
    # or bf16: forward and loss under bfloat16 autocast (CUDA and CPU); auto: bf16 where it is fast
    # (CUDA with bf16, a CPU with AMX), else fp32 (training/parallelize.py has the measurements)
    precision: str = "fp32"
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block's forward

    def validate(self) -> None:
        _check_types(self, "train")
        _check(
            self.weight_decay >= 0,
            f"train.weight_decay={self.weight_decay} must be >= 0 (a negative one grows the weights)",
        )
        _check(
            0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0,
            f"train.beta1={self.beta1} and train.beta2={self.beta2} must be in [0, 1)",
        )
        _check(
            self.optimizer in ("adamw", "muon"), f"train.optimizer={self.optimizer!r}: choose adamw or muon"
        )
        _check(
            not self.muon_convs or self.optimizer == "muon",
            "train.muon_convs=true needs train.optimizer=muon; with another optimizer set train.muon_convs=false",
        )
        _check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0 (0: no clipping)")
        _check(
            self.keep_checkpoints >= 0 and self.seed >= 0,
            "train.keep_checkpoints and train.seed must be >= 0",
        )
        for name in ("steps", "batch_size", "seq_len", "log_every", "max_bad_steps"):
            _check(getattr(self, name) > 0, f"train.{name} must be positive")
        _check(self.lr > 0 and self.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0")
        _check(
            self.warmup >= 0 and self.checkpoint_every >= 0,
            "train.warmup and train.checkpoint_every must be >= 0",
        )
        _check(
            0.0 <= self.ema < 1.0,
            f"train.ema={self.ema} must be in [0, 1) (0: no moving average), e.g. 0.999",
        )
        _check(self.ema_warmup > 1.0, f"train.ema_warmup={self.ema_warmup} must be > 1 (10: torch-ema's)")
        _check(
            self.parallel in ("auto", "none", "ddp", "fsdp"),
            f"train.parallel={self.parallel!r}: choose auto, none, ddp or fsdp",
        )
        _check(
            self.precision in ("fp32", "bf16", "auto"),
            f"train.precision={self.precision!r}: choose fp32, bf16 or auto",
        )
        self.check_tracking()


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = "debug"

    def validate(self) -> Config:
        for section in (self.model, self.objective, self.data, self.train):
            section.validate()
        _check(
            self.data.image_repr != "latents" or bool(self.model.vae),
            "data.image_repr=latents needs model.vae=DIR (a VAE from motfusion train-vae, or a diffusers AutoencoderKL)",
        )
        self._validate_image_tokens()
        if self.objective.contrastive_weight:
            _check(
                self.model.align_dim > 0,
                "objective.contrastive_weight needs model.align_dim > 0 (e.g. 64): "
                "the size of the image and text projections the loss compares",
            )
            _check(
                self.data.image_repr != "tokens",
                "objective.contrastive_weight needs continuous images "
                "(data.image_repr=pixels or latents), not VQ tokens",
            )
        _check(
            self.data.image_size % self.model.patch_size == 0,
            f"data.image_size={self.data.image_size} must be divisible by model.patch_size={self.model.patch_size}",
        )
        return self

    def _validate_image_tokens(self) -> None:
        """Images are discrete exactly when they have a vocabulary: the VQ codebook."""
        tokens, vocab = self.data.image_repr == "tokens", "image" in self.model.vocab_sizes
        _check(
            not tokens or vocab,
            "data.image_repr=tokens needs model.vocab_sizes=image:N, N the codebook size of model.vq",
        )
        _check(
            tokens or not vocab,
            "model.vocab_sizes has image, which makes images discrete: set data.image_repr=tokens",
        )
        _check(
            not tokens or bool(self.model.vq),
            "data.image_repr=tokens needs model.vq=DIR (a VQ-VAE from motfusion train-vq)",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """A saved config (config.json, a checkpoint's). Keys added since it was saved keep their
        default, except model.grid_pos: a model saved before it existed was trained without it."""
        cfg = cls()
        if "model" in d and "grid_pos" not in d["model"]:
            cfg.model.grid_pos = False
        return cfg.merge(d).validate()

    def merge(self, d: dict[str, Any]) -> Config:
        """Set the values of a nested dict in place ({"train": {"lr": 1e-3}}, as a config.json or a
        --config file holds them; any subset of keys). No validation."""
        for key, value in _flatten(d):
            _set(self, key, value)
        return self

    def override(self, overrides: list[str]) -> Config:
        """Apply `section.key=value` strings in place; values are parsed by the field's type."""
        return apply_overrides(self, overrides, "section.key=value").validate()


def read_config_file(path: Path) -> dict[str, Any]:
    """A --config file, .json or .yaml/.yml, as a nested dict of config values (any subset of keys)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # only for YAML files

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:  # one line: where, and what the parser expected
            mark, problem = (
                getattr(e, "problem_mark", None),
                getattr(e, "problem", None) or str(e).splitlines()[0],
            )
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where} is not valid YAML: {problem}") from None
    elif path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    else:
        raise ConfigError(f"{path}: a config file is .json, .yaml or .yml")
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, e.g. {{train: {{lr: 0.001}}}}")
    return values


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_types(section: Any, prefix: str) -> None:
    """Every field of a config section holds its annotated type, and every float is finite: a
    config.json is hand-editable, and nan or inf passes every range check. The first field that
    does not is a ConfigError naming its key."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, hint = getattr(section, f.name), hints[f.name]
        if not _is_type(value, hint):
            raise ConfigError(f"{prefix}.{f.name}={value!r} must be {_type_name(hint)}")


def _is_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a float here, as in JSON
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, tuple) and all(_is_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and _is_type(v, args[1]) for k, v in value.items()
        )
    return True  # nested dataclasses validate themselves


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    names = {
        int: "an integer",
        float: "a finite number",
        str: "a string",
        bool: "true or false",
        type(None): "none",
    }
    if hint in names:
        return names[hint]
    return {tuple: "a list", dict: "an object of key: value"}.get(typing.get_origin(hint), str(hint))


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "objective", "data", "train"):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def apply_overrides(obj: Any, items: list[str], form: str = "key=value") -> Any:
    """Apply `key=value` strings to the config dataclass `obj` in place (dotted keys reach nested
    dataclasses: `model.dim=96`, `mel.n_mels=40`), each value parsed by its field's type. The one
    command-line parser of every config: the run's `Config` and each auxiliary model's. No validation."""
    for item in items:
        key, sep, text = (s.strip() for s in item.partition("="))
        if not sep:
            raise ConfigError(f"override {item!r} must look like {form}")
        obj = _set(obj, key, _parse(key, text, _field_type(obj, key)))
    return obj


def dataclass_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """A config dataclass from its `dataclasses.asdict` (as read back from JSON: lists become tuples,
    nested dataclasses are rebuilt); an unknown key is a ConfigError that lists the valid ones."""
    hints, names = typing.get_type_hints(cls), {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
    values = {}
    for key, value in d.items():
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = dataclass_from_dict(hints[key], value)
        values[key] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _resolve(obj: Any, key: str) -> tuple[Any, str]:
    """`a.b.c` -> (the dataclass that holds field c, "c")."""
    *path, leaf = key.split(".")
    for part in path:
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names or not dataclasses.is_dataclass(getattr(obj, part)):
            sections = sorted(n for n in names if dataclasses.is_dataclass(getattr(obj, n)))
            raise ConfigError(f"unknown config key {key!r}; sections here: {sections}")
        obj = getattr(obj, part)
    names = {f.name for f in dataclasses.fields(obj)}
    if leaf not in names or dataclasses.is_dataclass(getattr(obj, leaf)):
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(names)}")
    return obj, leaf


def _field_type(obj: Any, key: str) -> Any:
    owner, leaf = _resolve(obj, key)
    return typing.get_type_hints(type(owner))[leaf]


def _set(obj: Any, key: str, value: Any) -> Any:
    if typing.get_origin(_field_type(obj, key)) is tuple and isinstance(value, list):
        value = tuple(value)
    return _assign(obj, key.split("."), value)


def _assign(obj: Any, path: list[str], value: Any) -> Any:
    """obj with obj.path = value, set in place; a frozen dataclass on the way is replaced by an updated copy."""
    head, *rest = path
    if rest:
        value = _assign(getattr(obj, head), rest, value)
    try:
        setattr(obj, head, value)
    except dataclasses.FrozenInstanceError:
        return dataclasses.replace(obj, **{head: value})
    return obj


def _parse(key: str, text: str, hint: Any) -> Any:
    """Parse a command-line string into the field's type, or raise ConfigError naming the key."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(text)
        if typing.get_origin(hint) is tuple:
            item_type = typing.get_args(hint)[0]
            return tuple(item_type(s.strip()) for s in text.split(",") if s.strip())
        if typing.get_origin(hint) is dict:
            pairs = [p.split(":") for p in text.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError
            value_type = typing.get_args(hint)[1]
            return {k.strip(): value_type(v.strip()) for k, v in pairs}
    except ValueError:
        pass
    else:
        raise ConfigError(f"{key}: unsupported type {hint}")
    raise ConfigError(
        f"{key}={text!r} is not a valid {getattr(hint, '__name__', hint)}"
        + (" (write key:value pairs, e.g. text:text,image:image)" if typing.get_origin(hint) is dict else "")
    )
