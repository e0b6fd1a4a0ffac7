"""Typed configuration: one keyword-only dataclass per component, dotted overrides (recipes.py: named ones).

A run is fully described by `Config`; `Config.to_dict()` is what gets written to DIR/config.json and
`Config.from_dict()` reads it back. Command-line overrides look like `model.untie=ffn,attn`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from motfusion.errors import ConfigError

UNTIE_CHOICES = ("ffn", "attn", "norm")
TRAINED_TOKENIZER = re.compile(r"bpe:(\d+)")  # data.tokenizer=bpe:N: a BPE trained with the run (tokenizer.py)


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
    attention_backend: str = "auto"  # auto: flex on CUDA, sdpa elsewhere
    patch_size: int = 4
    patcher: str = "linear"  # or "unet": Transfusion's U-Net down/up blocks around the backbone
    unet_channels: int = 32  # the U-Net's width at full resolution (doubles per level, up to 4x)
    unet_blocks: int = 1  # residual blocks per resolution, in each of the down and up paths
    unet_pooled: bool = False  # the image's mean hidden state conditions every up block (with the timestep)
    image_channels: int = 3
    vae: str = ""  # with data.image_repr=latents: a motfusion train-vae directory or a diffusers AutoencoderKL one
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
        _check(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0, "model.dim, model.n_layers and model.n_heads must be positive")
        _check(self.dim % self.n_heads == 0, f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        _check(self.head_dim % 2 == 0, f"model.dim / model.n_heads = {self.head_dim} must be even for RoPE")
        bad = sorted(set(self.untie) - set(UNTIE_CHOICES))
        _check(not bad, f"model.untie: unknown component(s) {bad}; choose any subset of {list(UNTIE_CHOICES)}")
        _check(self.image_attention in ("bidirectional", "causal"), f"model.image_attention={self.image_attention!r}: choose 'bidirectional' or 'causal'")
        _check(self.attention_backend in ("auto", "sdpa", "flex"), f"model.attention_backend={self.attention_backend!r}: choose 'auto', 'sdpa' or 'flex'")
        _check(self.patch_size > 0, "model.patch_size must be positive")
        _check(self.patcher in ("linear", "unet"), f"model.patcher={self.patcher!r}: choose 'linear' or 'unet'")
        if self.patcher == "unet":
            _check(self.patch_size & (self.patch_size - 1) == 0,
                   f"model.patch_size={self.patch_size} must be a power of 2 with model.patcher=unet")
            _check(self.unet_channels > 0 and self.unet_blocks > 0, "model.unet_channels and model.unet_blocks must be positive")
        _check("text" in self.towers, "model.towers must map the 'text' modality to a tower")
        _check("text" not in self.vocab_sizes and all(n > 0 for n in self.vocab_sizes.values()),
               "model.vocab_sizes: positive sizes for the discrete modalities other than text (text's is the tokenizer's)")
        untowered = sorted(set(self.vocab_sizes) - set(self.towers))
        _check(not untowered, f"model.towers must map {untowered} to a tower, e.g. model.towers=text:text,image:image,speech:speech")
        _check(self.text_moe_experts >= 0, "model.text_moe_experts must be >= 0 (0: no mixture of experts)")
        _check(not self.text_moe_experts or 1 <= self.moe_top_k <= self.text_moe_experts,
               f"model.moe_top_k={self.moe_top_k} must be between 1 and model.text_moe_experts={self.text_moe_experts}")


@dataclass(kw_only=True)
class ObjectiveConfig:
    image_loss_weight: float = 5.0  # lambda in L = L_LM + lambda * L_diffusion
    diffusion: str = "ddpm"  # ddpm (epsilon, cosine schedule) or flow (rectified flow, velocity)
    num_timesteps: int = 1000
    flow_timesteps: str = "uniform"  # flow's training noise levels: uniform, or logit_normal (SD3)
    cfg_dropout: float = 0.1  # probability of dropping an image's caption (classifier-free guidance)
    image_first_noise_cap: int | None = 500  # max timestep of an image that precedes its caption
    loss_weights: dict[str, float] = field(default_factory=dict)  # per discrete modality's LM loss; default 1
    moe_balance_weight: float = 0.01  # Switch's load-balancing loss, with model.text_moe_experts
    contrastive_weight: float = 0.0  # > 0: + w * InfoNCE between each image and its document's text

    def validate(self) -> None:
        _check(self.diffusion in ("ddpm", "flow"), f"objective.diffusion={self.diffusion!r}: choose 'ddpm' or 'flow'")
        _check(self.flow_timesteps in ("uniform", "logit_normal"),
               f"objective.flow_timesteps={self.flow_timesteps!r}: choose 'uniform' or 'logit_normal'")
        _check(0.0 <= self.cfg_dropout < 1.0, "objective.cfg_dropout must be in [0, 1)")
        _check(self.image_loss_weight >= 0, "objective.image_loss_weight must be >= 0")
        _check(all(w >= 0 for w in self.loss_weights.values()) and self.moe_balance_weight >= 0,
               "objective.loss_weights and objective.moe_balance_weight must be >= 0")
        _check(self.contrastive_weight >= 0, "objective.contrastive_weight must be >= 0")
        cap = self.image_first_noise_cap
        _check(cap is None or 0 < cap <= self.num_timesteps, f"objective.image_first_noise_cap must be in (0, {self.num_timesteps}] or none")


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "shapes"
    image_size: int = 32
    image_repr: str = "pixels"  # or "latents": images encoded by the frozen VAE in model.vae; or "tokens": VQ codes
    tokenizer: str = "bytes"  # bytes; bpe:N (trained with the run on its text, see tokenizer.py); or a BPE json path
    caption_first_prob: float = 0.8  # else the image comes first (captioning)
    max_objects: int = 3
    single_object_prob: float = 0.5
    # User data (manifest:PATH, folder:PATH): checked once before training, see data/user.py.
    on_bad_sample: str = "error"  # error: stop naming the first bad file; skip: train on the rest
    val_fraction: float = 0.05  # share of samples held out for val, chosen by a hash of each sample
    min_image_size: int = 0  # shorter image side in pixels; 0: data.image_size (no upscaling)
    max_image_pixels: int = 50_000_000  # larger images are rejected before they are decoded
    # data.dataset=speech:DIR (data/speech.py): text->speech and speech->text, with shapes mixed in.
    speech_text_first_prob: float = 0.5  # a speech document is text->speech, else speech->text
    speech_shapes_share: float = 0.5  # share of shapes text-image documents in the speech dataset

    def validate(self) -> None:
        _check(bool(self.dataset), "data.dataset must name a dataset, e.g. shapes")  # resolved in data.pipeline
        bpe = TRAINED_TOKENIZER.fullmatch(self.tokenizer)
        _check(not self.tokenizer.startswith("bpe:") or (bpe is not None and int(bpe.group(1)) > 272),
               f"data.tokenizer={self.tokenizer!r}: bpe:N needs N > 272 (256 bytes and 16 specials), e.g. bpe:512")
        _check(self.image_size >= 8, "data.image_size must be >= 8")
        _check(self.image_repr in ("pixels", "latents", "tokens"),
               f"data.image_repr={self.image_repr!r}: choose 'pixels', 'latents' or 'tokens'")
        _check(0.0 <= self.caption_first_prob <= 1.0, "data.caption_first_prob must be in [0, 1]")
        _check(self.on_bad_sample in ("error", "skip"), f"data.on_bad_sample={self.on_bad_sample!r}: choose 'error' or 'skip'")
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
        _check(self.min_image_size >= 0 and self.max_image_pixels > 0,
               "data.min_image_size must be >= 0 and data.max_image_pixels positive")
        _check(0.0 <= self.speech_text_first_prob <= 1.0 and 0.0 <= self.speech_shapes_share < 1.0,
               "data.speech_text_first_prob must be in [0, 1] and data.speech_shapes_share in [0, 1)")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-4
    min_lr: float = 1.5e-5
    warmup: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema: float = 0.0  # decay of the weights' moving average that sampling uses (0: none); training/ema.py
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    log_every: int = 10
    device: str = "auto"  # auto: cuda if available, else cpu
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss or gradient
    tensorboard: bool = True  # event files beside metrics.jsonl
    # Several processes (torchrun): batch_size is the GLOBAL batch, split evenly over the ranks.
    parallel: str = "auto"  # auto: ddp with several processes, none with one; or ddp, fsdp (FSDP2)
    precision: str = "fp32"  # or bf16: forward and loss under bfloat16 autocast (CUDA and CPU)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block's forward

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "max_bad_steps"):
            _check(getattr(self, name) > 0, f"train.{name} must be positive")
        _check(self.lr > 0 and self.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0")
        _check(self.warmup >= 0 and self.checkpoint_every >= 0, "train.warmup and train.checkpoint_every must be >= 0")
        _check(0.0 <= self.ema < 1.0, f"train.ema={self.ema} must be in [0, 1) (0: no moving average), e.g. 0.999")
        _check(self.parallel in ("auto", "none", "ddp", "fsdp"), f"train.parallel={self.parallel!r}: choose auto, none, ddp or fsdp")
        _check(self.precision in ("fp32", "bf16"), f"train.precision={self.precision!r}: choose fp32 or bf16")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = "debug"

    def validate(self) -> "Config":
        for section in (self.model, self.objective, self.data, self.train):
            section.validate()
        _check(self.data.image_repr != "latents" or bool(self.model.vae),
               "data.image_repr=latents needs model.vae=DIR (a VAE from motfusion train-vae, or a diffusers AutoencoderKL)")
        self._validate_image_tokens()
        if self.objective.contrastive_weight:
            _check(self.model.align_dim > 0, "objective.contrastive_weight needs model.align_dim > 0 (e.g. 64): "
                   "the size of the image and text projections the loss compares")
            _check(self.data.image_repr != "tokens", "objective.contrastive_weight needs continuous images "
                   "(data.image_repr=pixels or latents), not VQ tokens")
        _check(self.data.image_size % self.model.patch_size == 0,
               f"data.image_size={self.data.image_size} must be divisible by model.patch_size={self.model.patch_size}")
        return self

    def _validate_image_tokens(self) -> None:
        """Images are discrete exactly when they have a vocabulary: the VQ codebook."""
        tokens, vocab = self.data.image_repr == "tokens", "image" in self.model.vocab_sizes
        _check(not tokens or vocab, "data.image_repr=tokens needs model.vocab_sizes=image:N, N the codebook size of model.vq")
        _check(tokens or not vocab, "model.vocab_sizes has image, which makes images discrete: set data.image_repr=tokens")
        _check(not tokens or bool(self.model.vq), "data.image_repr=tokens needs model.vq=DIR (a VQ-VAE from motfusion train-vq)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        for key, value in _flatten(d):
            _set(cfg, key, value)
        return cfg.validate()

    def override(self, overrides: list[str]) -> "Config":
        """Apply `section.key=value` strings in place; values are parsed by the field's type."""
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            _set(self, key.strip(), _parse(key.strip(), text.strip(), _field_type(self, key.strip())))
        return self.validate()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "objective", "data", "train"):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def _resolve(cfg: Config, key: str) -> tuple[Any, str]:
    *path, leaf = key.split(".")
    obj = cfg
    for part in path:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown config key {key!r}; sections are model, objective, data, train")
        obj = getattr(obj, part)
    names = {f.name for f in dataclasses.fields(obj)}
    if leaf not in names or dataclasses.is_dataclass(getattr(obj, leaf)):
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(names)}")
    return obj, leaf


def _field_type(cfg: Config, key: str) -> Any:
    obj, leaf = _resolve(cfg, key)
    return typing.get_type_hints(type(obj))[leaf]


def _set(cfg: Config, key: str, value: Any) -> None:
    obj, leaf = _resolve(cfg, key)
    hint = typing.get_type_hints(type(obj))[leaf]
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        value = tuple(value)
    setattr(obj, leaf, value)


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
            return tuple(s.strip() for s in text.split(",") if s.strip())
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
    raise ConfigError(f"{key}={text!r} is not a valid {getattr(hint, '__name__', hint)}"
                      + (" (write key:value pairs, e.g. text:text,image:image)" if typing.get_origin(hint) is dict else ""))
