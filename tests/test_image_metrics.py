"""Image metrics: the Fréchet distance against closed forms, InfoNCE at its two extremes, the
classifier and CLIP trainers, and the fashion eval suite end to end on tiny files."""

import json
import math

import numpy as np
import pytest
import torch
from test_real_data import tiny_fashion

from motfusion.cli import main
from motfusion.evaluation.classifier import (
    ClassifierConfig,
    load_classifier,
    save_classifier,
    train_classifier,
)
from motfusion.evaluation.clip import (
    ClipConfig,
    clip_score,
    load_clip,
    retrieval_accuracy,
    save_clip,
    train_clip,
)
from motfusion.evaluation.image_metrics import frechet_distance, frechet_distance_of
from motfusion.evaluation.losses import validation_losses
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import info_nce
from motfusion.recipes import get_recipe
from motfusion.tokenizer import ByteTokenizer


def random_spd(rng: np.random.Generator, n: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(n, rank or n))
    return a @ a.T / n


def test_frechet_is_zero_for_identical_features():
    x = np.random.default_rng(0).normal(size=(300, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # rotating both Gaussians changes nothing
    rotated = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_matches_the_trace_of_the_product_root():
    """tr((s1 s2)^(1/2)) as the sum of square roots of the (real, positive) eigenvalues of s1 s2."""
    rng = np.random.default_rng(1)
    s1, s2 = random_spd(rng, 10), random_spd(rng, 10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    cross = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("rank", [None, 3])  # full rank, and singular (fewer samples than features)
def test_frechet_is_symmetric(rank):
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(rng, 12, rank), random_spd(rng, 12, rank)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert d12 == pytest.approx(d21, rel=1e-8) and d12 > 0


def test_info_nce_extremes():
    torch.manual_seed(0)
    N = 64
    a = torch.randn(N, 256)
    aligned = info_nce(a, a, logit_scale=math.log(100))
    assert aligned < 1e-3
    shuffled = info_nce(a, a[torch.randperm(N)], logit_scale=0.0)  # exp(0) = 1: logits are cosines
    assert abs(shuffled.item() - math.log(N)) < 0.1
    b = torch.randn(N, 256)
    assert torch.allclose(info_nce(a, b, 1.0), info_nce(b, a, 1.0))  # symmetric
    assert torch.allclose(info_nce(a, b, 1.0, positives=torch.eye(N, dtype=torch.bool)), info_nce(a, b, 1.0))


def test_info_nce_positives_share_the_target():
    a = torch.randn(4, 8)
    same = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    swapped = a[[1, 0, 2, 3]]  # pairing 0 with 1 is as good as with itself when they share a class
    assert torch.allclose(info_nce(a, a, 2.0, same), info_nce(a, swapped, 2.0, same))


class OneHotEmbedder:
    """Stands in for a ClipModel: texts embed as one-hot by caption; images as the caption in `seen`."""

    def __init__(self, vocab: list[str], seen: list[str]):
        self.vocab, self.seen = vocab, seen

    def embed(self, images=None, texts=None):
        names = [self.seen[int(i)] for i in images[:, 0, 0, 0]] if images is not None else texts
        return torch.eye(len(self.vocab))[[self.vocab.index(n) for n in names]]


def test_retrieval_ranks_distinct_captions():
    from types import SimpleNamespace

    captions = ["a cat", "a dog", "a cat", "a fox"]
    samples = [
        SimpleNamespace(image=torch.full((3, 2, 2), float(i)), caption=c) for i, c in enumerate(captions)
    ]
    vocab = ["a cat", "a dog", "a fox"]
    assert retrieval_accuracy(OneHotEmbedder(vocab, captions), samples, (1, 3)) == {
        "image_to_text_top1": 1.0,
        "image_to_text_top3": 1.0,
    }
    fooled = OneHotEmbedder(vocab, ["a fox"] * 4)  # every image looks like the fox
    assert retrieval_accuracy(fooled, samples, (1, 3)) == {
        "image_to_text_top1": 0.25,
        "image_to_text_top3": 1.0,
    }


def halves(n: int, seed: int = 0):
    """(n, 28, 28) uint8 images whose class (0, 1, 2) is which half is bright (top, left, top-left), with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    patterns = torch.stack([yy < 14, xx < 14, xx + yy < 28]).float()
    images = patterns[labels] * 180 + torch.rand(n, 28, 28, generator=g) * 75
    return images.to(torch.uint8), labels


def test_classifier_learns_and_round_trips(tmp_path):
    images, labels = halves(96)
    cfg = ClassifierConfig(steps=30, batch_size=16, width=4, feature_dim=16, input_size=14, lr=1e-2)
    model, losses = train_classifier(cfg, images, labels)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    x = torch.rand(5, 3, 16, 16) * 2 - 1  # any image size: resized to input_size
    assert model.features(x).shape == (5, 16)
    save_classifier(model, cfg, {"test_accuracy": 0.0}, tmp_path)
    assert torch.equal(load_classifier(tmp_path)(x), model(x))
    with pytest.raises(FileNotFoundError, match="motfusion train-classifier"):
        load_classifier(tmp_path / "none")


class HalfPairs:
    """A finite dataset of (image, caption, label) samples for CLIP: the caption names the bright half."""

    def __init__(self, n: int):
        self.images, self.labels = halves(n)
        self.names = ("bright top half", "bright left half", "bright top-left corner")

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, i: int):
        from motfusion.data.fashion import FashionSample, to_model_image

        label = int(self.labels[i])
        return FashionSample(to_model_image(self.images[i], 16), self.names[label], label)


def test_clip_learns_and_round_trips(tmp_path):
    data = HalfPairs(48)
    cfg = ClipConfig(
        embed_dim=16,
        width=8,
        input_size=16,
        text_dim=16,
        text_layers=1,
        text_heads=2,
        steps=30,
        batch_size=12,
        lr=1e-2,
    )
    model, losses = train_clip(cfg, data)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    images = torch.stack([data.sample(i).image for i in range(6)])
    captions = [data.sample(i).caption for i in range(6)]
    cos = torch.nn.functional.cosine_similarity(model.image(images), model.text(captions))
    assert clip_score(model, images, captions) == pytest.approx(100 * cos.mean().item(), rel=1e-5)
    save_clip(model, tmp_path, {"dataset": "halves"})
    again, meta = load_clip(tmp_path)
    assert meta["dataset"] == "halves" and torch.equal(again.image(images), model.image(images))
    with pytest.raises(FileNotFoundError, match="motfusion train-clip"):
        load_clip(tmp_path / "none")


def test_validation_losses_are_fixed(tmp_path):
    tiny_fashion(tmp_path)
    cfg = get_recipe("debug").override([f"data.dataset=fashion:{tmp_path}"])
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, ByteTokenizer().vocab_size)
    first = validation_losses(model, cfg, ByteTokenizer(), n_batches=2)
    assert set(first) >= {"val_loss", "val_loss/text", "val_loss/image"}
    assert first == validation_losses(model, cfg, ByteTokenizer(), n_batches=2)
    assert all(p.grad is None for p in model.parameters())


def test_eval_fashion_suite_end_to_end(tmp_path, capsys):
    """train -> train-classifier -> train-clip -> eval --suite fashion, on tiny IDX files."""
    data = tmp_path / "fmnist"
    tiny_fashion(data, n_train=20, n_test=12)
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--recipe", "debug", "--out", str(run), "--steps", "2", f"data.dataset=fashion:{data}"]
        )
        == 0
    )
    assert (
        main(
            [
                "train-classifier",
                "--out",
                str(tmp_path / "cls"),
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--data",
                str(data),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "cls" / "config.json").read_text())["metrics"]["test_accuracy"] >= 0
    assert (
        main(
            [
                "train-clip",
                "--dataset",
                f"fashion:{data}",
                "--out",
                str(tmp_path / "clip"),
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--image-size",
                "16",
            ]
        )
        == 0
    )
    assert "zero_shot_accuracy" in json.loads((tmp_path / "clip" / "config.json").read_text())["metrics"]
    status = main(
        [
            "eval",
            "--ckpt",
            str(run),
            "--suite",
            "fashion",
            "--n",
            "4",
            "--steps",
            "2",
            "--max-tokens",
            "8",
            "--val-batches",
            "1",
            "--classifier",
            str(tmp_path / "cls"),
            "--clip",
            str(tmp_path / "clip"),
        ]
    )
    assert status == 0
    metrics = json.loads((run / "eval_fashion.json").read_text())
    for key in (
        "fid_fashion_classifier",
        "class_accuracy",
        "clip_score_motfusion",
        "caption_accuracy",
        "val_loss/image",
    ):
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["class_accuracy"] <= 1 and metrics["fid_fashion_classifier"] >= 0
    assert main(["eval", "--ckpt", str(run), "--suite", "emoji", "--clip", str(tmp_path / "nothing")]) == 2
    assert "motfusion train-clip" in capsys.readouterr().err
