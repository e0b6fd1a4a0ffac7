"""One artifact format for the auxiliary models (VAE, VQ-VAE, speech units, classifier, CLIP): round
trips, the older per-kind layouts still loading, one-line errors for a wrong directory, the one LR
schedule, and the shared training loop."""

import dataclasses
import json
import math

import pytest
import safetensors.torch
import torch
from test_real_data import tiny_fashion

from motfusion.artifacts import KINDS, kind_of, load_artifact, save_artifact
from motfusion.cli import main
from motfusion.codecs.audio import MelConfig
from motfusion.codecs.speech import SpeechTokenizer, SpeechTokenizerConfig
from motfusion.codecs.vae import VAEConfig, build_vae, load_trained_vae, load_vae, save_vae
from motfusion.codecs.vq import VQVAE, VQConfig, load_vq, save_vq
from motfusion.config import TrainConfig, apply_overrides
from motfusion.errors import ConfigError, NonFiniteLossError
from motfusion.evaluation.classifier import (
    ClassifierConfig,
    FashionClassifier,
    load_classifier,
    save_classifier,
)
from motfusion.evaluation.clip import ClipConfig, ClipModel, load_clip, save_clip
from motfusion.training.loop import LoopConfig, cosine_lr, train_loop
from motfusion.training.trainer import lr_at
from motfusion.training.vae import loop_config as vae_loop_config

IMAGES = torch.rand(2, 3, 16, 16) * 2 - 1


def tiny_vae():
    cfg = VAEConfig(channels=8, norm_groups=4, image_size=16, scale_factor=0.5)
    torch.manual_seed(0)
    return build_vae(cfg).eval(), cfg


def tiny_vq():
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(image_size=16, codebook_size=8, code_dim=4, channels=8, res_blocks=0))
    vq.codebook.embed.normal_()
    return vq.eval()


def tiny_speech():
    cfg = SpeechTokenizerConfig(k=3, mel=MelConfig(n_mels=2))
    g = torch.Generator().manual_seed(0)
    return SpeechTokenizer(
        cfg, torch.randn(3, 2, generator=g), torch.randn(2, generator=g), torch.rand(2, generator=g) + 1
    )


def tiny_classifier():
    torch.manual_seed(0)
    cfg = ClassifierConfig(width=4, feature_dim=8, input_size=14)
    return FashionClassifier(cfg).eval(), cfg


def tiny_clip():
    torch.manual_seed(0)
    return ClipModel(
        ClipConfig(embed_dim=8, width=4, input_size=16, text_dim=8, text_layers=1, text_heads=2)
    ).eval()


def write_legacy(path, weights: str, config: str, tensors: dict, meta: dict):
    """A directory as the releases before the artifact format wrote it, file names and JSON layout."""
    path.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path / weights)
    (path / config).write_text(json.dumps(meta))
    return path


# ---- round trips -------------------------------------------------------------------------------


def test_every_kind_round_trips_through_weights_and_config(tmp_path):
    vae, vae_cfg = tiny_vae()
    save_vae(tmp_path / "vae", vae, vae_cfg)
    again, cfg = load_trained_vae(tmp_path / "vae")
    assert cfg == vae_cfg and torch.equal(again.encode(IMAGES).mean, vae.encode(IMAGES).mean)

    vq = tiny_vq()
    save_vq(vq, tmp_path / "vq", {"psnr": 1.0})
    assert torch.equal(load_vq(tmp_path / "vq").encode(IMAGES), vq.encode(IMAGES))

    tok = tiny_speech()
    tok.save(tmp_path / "speech")
    frames = torch.randn(7, 2)
    loaded = SpeechTokenizer.load(tmp_path / "speech")
    assert loaded.cfg == tok.cfg and torch.equal(loaded.encode_frames(frames), tok.encode_frames(frames))

    classifier, cls_cfg = tiny_classifier()
    save_classifier(classifier, cls_cfg, {"test_accuracy": 0.5}, tmp_path / "classifier")
    assert torch.equal(load_classifier(tmp_path / "classifier")(IMAGES), classifier(IMAGES))

    clip = tiny_clip()
    save_clip(clip, tmp_path / "clip", {"metrics": {"zero_shot_accuracy": 0.25}})
    again, info = load_clip(tmp_path / "clip")
    assert info == {"metrics": {"zero_shot_accuracy": 0.25}} and torch.equal(
        again.image(IMAGES), clip.image(IMAGES)
    )

    for kind, name in [
        ("vae", "vae"),
        ("vq", "vq"),
        ("speech-units", "speech"),
        ("classifier", "classifier"),
        ("clip", "clip"),
    ]:
        meta = json.loads((tmp_path / name / "config.json").read_text())
        assert meta["kind"] == kind == kind_of(tmp_path / name) and "config" in meta
        assert {"weights.safetensors", "config.json"} <= {p.name for p in (tmp_path / name).iterdir()}
    assert (tmp_path / "vq" / "metrics.json").is_file()


def test_artifact_keeps_config_info_and_tensors(tmp_path):
    tensors = {"w": torch.arange(6.0).view(2, 3)}
    save_artifact(tmp_path, "clip", tensors, {"a": 1, "b": [1, 2]}, {"metrics": {"x": 0.5}})
    artifact = load_artifact(tmp_path, "clip")
    assert artifact.config == {"a": 1, "b": [1, 2]} and artifact.info == {"metrics": {"x": 0.5}}
    assert torch.equal(artifact.tensors["w"], tensors["w"])


# ---- the older layouts -------------------------------------------------------------------------


def test_old_vae_directory_loads(tmp_path):
    vae, cfg = tiny_vae()
    path = write_legacy(tmp_path / "old", "model.safetensors", "config.json", vae.state_dict(), cfg.to_dict())
    codec = load_vae(path)
    assert codec.scale == 0.5 and torch.equal(codec.encode(IMAGES), 0.5 * vae.encode(IMAGES).mean)


def test_old_vq_directory_loads(tmp_path):
    vq = tiny_vq()
    architecture = (
        "codebook_size",
        "code_dim",
        "channels",
        "downsample",
        "res_blocks",
        "image_channels",
        "image_size",
        "beta",
        "decay",
        "dead_below",
    )  # the old vq_config.json: no training fields
    meta = {k: v for k, v in dataclasses.asdict(vq.cfg).items() if k in architecture}
    path = write_legacy(tmp_path / "old", "vq.safetensors", "vq_config.json", vq.state_dict(), meta)
    assert torch.equal(load_vq(path).encode(IMAGES), vq.encode(IMAGES))


def test_old_speech_units_directory_loads(tmp_path):
    tok = tiny_speech()
    tensors = {"centroids": tok.centroids, "mean": tok.mean, "std": tok.std}
    path = write_legacy(tmp_path / "old", "centroids.safetensors", "config.json", tensors, tok.cfg.to_dict())
    frames = torch.randn(7, 2)
    assert torch.equal(SpeechTokenizer.load(path).encode_frames(frames), tok.encode_frames(frames))


def test_old_classifier_and_clip_directories_load(tmp_path):
    classifier, cfg = tiny_classifier()
    meta = {"config": dataclasses.asdict(cfg), "metrics": {"test_accuracy": 0.9}, "classes": ["a"]}
    path = write_legacy(
        tmp_path / "cls", "classifier.safetensors", "classifier.json", classifier.state_dict(), meta
    )
    assert torch.equal(load_classifier(path)(IMAGES), classifier(IMAGES))

    clip = tiny_clip()
    config = {
        k: v for k, v in dataclasses.asdict(clip.cfg).items() if k != "dataset"
    }  # no dataset field then
    meta = {"config": config, "dataset": "emoji", "image_size": 16, "metrics": {"image_to_text_top1": 0.1}}
    path = write_legacy(tmp_path / "clip", "clip.safetensors", "clip.json", clip.state_dict(), meta)
    again, info = load_clip(path)
    assert info["dataset"] == "emoji" and info["metrics"]["image_to_text_top1"] == 0.1
    assert torch.equal(again.image(IMAGES), clip.image(IMAGES))


# ---- wrong directories -------------------------------------------------------------------------


def test_a_wrong_directory_says_what_it_holds(tmp_path):
    save_vq(tiny_vq(), tmp_path / "vq")
    with pytest.raises(
        ConfigError, match=r"holds a VQ-VAE image tokenizer \(motfusion train-vq\), not a Fashion-MNIST"
    ):
        load_classifier(tmp_path / "vq")
    with pytest.raises(ConfigError, match="holds a VQ-VAE image tokenizer .*, not a KL-VAE"):
        load_vae(tmp_path / "vq")
    classifier, cfg = tiny_classifier()
    meta = {"config": dataclasses.asdict(cfg), "metrics": {}, "classes": []}
    old = write_legacy(
        tmp_path / "cls", "classifier.safetensors", "classifier.json", classifier.state_dict(), meta
    )
    with pytest.raises(ConfigError, match="holds a Fashion-MNIST classifier .*, not a CLIP model"):
        load_clip(old)
    checkpoint = write_legacy(
        tmp_path / "ckpt",
        "model.safetensors",
        "config.json",
        {"w": torch.zeros(1)},
        {"model": {}, "train": {}},
    )  # the main trainer's checkpoint: the old VAE's names
    with pytest.raises(ConfigError, match="holds a motfusion training checkpoint, not a KL-VAE"):
        load_vae(checkpoint)
    with pytest.raises(FileNotFoundError, match="does not hold a speech unit codec.*train-speech-tokenizer"):
        SpeechTokenizer.load(tmp_path / "empty")
    assert set(KINDS) == {"vae", "vq", "speech-units", "classifier", "clip", "asr-judge", "unit-vocoder"}


# ---- the schedule and the loop -----------------------------------------------------------------


def old_trainer_lr(step, lr, min_lr, warmup, steps):
    """training/trainer.py's lr_at before the shared schedule, verbatim in its arithmetic."""
    if step <= warmup:
        return lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    "lr,min_lr,warmup,steps", [(3e-4, 1.5e-5, 10, 100), (1e-3, 0.0, 0, 7), (2e-3, 2e-4, 5, 5)]
)
def test_schedule_equals_the_old_trainer_schedule(lr, min_lr, warmup, steps):
    tcfg = TrainConfig(lr=lr, min_lr=min_lr, warmup=warmup, steps=steps)
    for step in range(1, steps + 3):
        expected = old_trainer_lr(step, lr, min_lr, warmup, steps)
        assert lr_at(step, tcfg) == expected
        assert cosine_lr(step, lr=lr, steps=steps, warmup=warmup, min_lr=min_lr) == expected


def test_auxiliary_schedules_keep_their_old_numbers():
    vae = VAEConfig(lr=3e-3, warmup=50, steps=500)
    vq_lr, vq_steps = 2e-3, 40
    clip_lr, clip_steps = 2e-3, 400
    clip_warmup = max(1, clip_steps // 20)
    for step in range(1, 501):
        old_vae = (
            vae.lr * step / vae.warmup
            if step <= vae.warmup
            else vae.lr
            * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - vae.warmup) / (vae.steps - vae.warmup))))
        )
        assert vae_loop_config(vae).lr_at(step) == pytest.approx(old_vae, rel=1e-12)
    for step in range(1, vq_steps + 1):
        old_vq = vq_lr * (0.55 + 0.45 * math.cos(math.pi * step / vq_steps))
        assert cosine_lr(step, lr=vq_lr, steps=vq_steps, min_lr=vq_lr / 10) == pytest.approx(
            old_vq, rel=1e-12
        )
    for step in range(1, clip_steps + 1):
        old_clip = (
            clip_lr * step / clip_warmup
            if step <= clip_warmup
            else clip_lr * 0.5 * (1 + math.cos(math.pi * (step - clip_warmup) / (clip_steps - clip_warmup)))
        )
        assert cosine_lr(step, lr=clip_lr, steps=clip_steps, warmup=clip_warmup) == pytest.approx(
            old_clip, rel=1e-12, abs=1e-18
        )


def test_loop_stops_on_a_non_finite_loss_before_the_update():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(8, 3)
    snapshots = []

    def step_loss(step):
        snapshots.append(model.weight.detach().clone())
        loss = model(x).square().mean()
        return (loss * float("nan") if step == 3 else loss), {"scale": 1.0}

    lines = []
    with pytest.raises(NonFiniteLossError, match="non-finite toy loss") as info:
        train_loop(
            model.parameters(), step_loss, LoopConfig(name="toy", steps=10, lr=0.1, log_every=1), lines.append
        )
    assert math.isnan(info.value.stats["loss"])
    assert torch.equal(model.weight, snapshots[-1])  # step 3 applied nothing
    assert len(lines) == 2 and lines[0].startswith("toy step 1/10 | loss") and "scale 1" in lines[0]


def test_loop_lowers_the_loss_and_logs_on_schedule():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    logged = []
    cfg = LoopConfig(name="toy", steps=20, lr=0.1, warmup=2, grad_clip=1.0, log_every=8)
    history = train_loop(
        model.parameters(), lambda step: ((model(x) - y).square().mean(), {}), cfg, None, logged.append
    )
    assert [r["step"] for r in logged] == [8, 16, 20] and len(history) == 20
    assert history[-1]["loss"] < history[0]["loss"] and history[1]["lr"] == cfg.lr_at(2) == 0.1


# ---- one override parser -----------------------------------------------------------------------


def test_overrides_reach_any_config_dataclass():
    cfg = apply_overrides(SpeechTokenizerConfig(), ["k=16", "dedup=true", "mel.n_mels=40"])
    assert (
        cfg.k == 16 and cfg.dedup is True and cfg.mel.n_mels == 40
    )  # MelConfig is frozen: replaced, not mutated
    assert apply_overrides(VAEConfig(), ["channel_mult=1,2,4"]).channel_mult == (1, 2, 4)
    with pytest.raises(ConfigError, match="codebook_sise"):
        apply_overrides(VQConfig(), ["codebook_sise=8"])


def test_train_classifier_takes_key_value_overrides(tmp_path):
    tiny_fashion(tmp_path / "data", n_train=16, n_test=4)
    out = tmp_path / "cls"
    assert (
        main(
            [
                "train-classifier",
                "--out",
                str(out),
                "--data",
                str(tmp_path / "data"),
                "--steps",
                "2",
                "batch_size=4",
                "width=4",
                "feature_dim=8",
            ]
        )
        == 0
    )
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "classifier" and meta["config"]["width"] == 4 and meta["config"]["steps"] == 2
    assert main(["train-classifier", "--out", str(out), "widht=4"]) == 2
