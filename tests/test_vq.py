"""The VQ-VAE image tokenizer: shapes and round trips, the moving-average codebook, its metrics,
training, files, and the checks that tie it to a run's config."""

import json

import pytest
import torch

from motfusion.cli import main
from motfusion.codecs.image import Tokens
from motfusion.codecs.vq import (
    VQVAE,
    Codebook,
    VQConfig,
    load_image_tokenizer,
    load_vq,
    perplexity,
    psnr,
    save_vq,
)
from motfusion.errors import ConfigError
from motfusion.recipes import get_recipe
from motfusion.sequence import Image, Text, Units
from motfusion.training.vq import ImageSource

TINY = dict(image_size=16, codebook_size=32, code_dim=8, channels=16, res_blocks=1)


def shapes(n: int, size: int = 16, split: str = "train") -> torch.Tensor:
    return ImageSource("shapes", size, split).batch(0, n)


def make_vq_dir(path, seed: int = 0):
    """A tiny VQ-VAE whose codebook was initialized on shapes images (untrained otherwise)."""
    torch.manual_seed(seed)
    vq = VQVAE(VQConfig(**TINY)).train()
    vq(shapes(8))  # the first training forward initializes the codebook from the encoder's outputs
    save_vq(vq.eval(), path)
    return path


def test_shapes_and_round_trip():
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(codebook_size=64, channels=16, res_blocks=1)).train()
    x = shapes(4, 32)
    vq(x)
    vq.eval()
    out = vq(x)
    codes = vq.encode(x)
    assert codes.shape == (4, 64) and out.recon.shape == x.shape  # 32px, 4x downsampling: 8 x 8 codes
    assert codes.min() >= 0 and codes.max() < 64 and torch.equal(codes, out.codes)
    torch.testing.assert_close(vq.decode(codes), out.recon.clamp(-1, 1))


def test_nearest_entry_and_moving_average_update():
    book = Codebook(size=3, dim=2, decay=0.5, dead_below=0.0)
    book.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    book.total.copy_(book.embed)
    book.count.fill_(1.0)
    z = torch.tensor([[1.0, 0.0], [9.0, 1.0], [11.0, -1.0]])
    codes = book.assign(z)
    assert codes.tolist() == [0, 1, 1]
    book.update(z, codes)
    # count = 0.5 * 1 + 0.5 * n, total = 0.5 * old + 0.5 * sum; each entry moves toward its members' mean
    torch.testing.assert_close(book.count, torch.tensor([1.0, 1.5, 0.5]))
    torch.testing.assert_close(book.embed[1], torch.tensor([(5.0 + 10.0) / 1.5, 0.0]), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(book.embed[0], torch.tensor([0.5 / 1.0, 0.0]), atol=1e-3, rtol=1e-4)


def test_unused_entries_are_restarted_on_encoder_outputs():
    torch.manual_seed(0)
    book = Codebook(size=4, dim=2, decay=0.9, dead_below=0.5)
    z = torch.randn(64, 2) + 100.0  # far from every entry but one
    book.initialize(torch.zeros(4, 2))
    book.embed[0] = 100.0
    for _ in range(10):
        book.update(z, book.assign(z))
    rows = {tuple(r) for r in z.tolist()}
    assert all(
        tuple(e) in rows or e[0] > 90 for e in book.embed.tolist()
    )  # the stale entries moved onto data
    assert len(book.assign(z).unique()) > 1


def test_metrics():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    noisy = x + 0.1
    torch.testing.assert_close(
        psnr(noisy, x), torch.full((2,), 10 * torch.log10(torch.tensor(4 / 0.01)).item())
    )
    assert perplexity(torch.arange(16), 16) == pytest.approx(16.0)
    assert perplexity(torch.zeros(16, dtype=torch.long), 16) == pytest.approx(1.0)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(**TINY)).train()
    opt = torch.optim.AdamW(vq.parameters(), lr=3e-3)
    x = shapes(16)
    losses = []
    for _ in range(30):
        loss, _ = vq.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_load_round_trip_and_image_tokens(tmp_path):
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(**TINY)).train()
    x = shapes(8)
    vq(x)
    save_vq(vq.eval(), tmp_path / "vq")
    loaded = load_vq(tmp_path / "vq")
    codes = vq.encode(x)
    assert torch.equal(loaded.encode(x), codes) and torch.equal(loaded.decode(codes), vq.decode(codes))
    doc, other = Tokens(loaded).documents([[Text("a"), Image(x[0])], [Image(x[1]), Text("b")]])
    assert torch.equal(other[0].ids, codes[1])
    assert isinstance(doc[1], Units) and doc[1].modality == "image" and torch.equal(doc[1].ids, codes[0])


def test_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="power of 2"):
        VQConfig(downsample=3).validate()
    with pytest.raises(FileNotFoundError, match="train-vq"):
        load_vq(tmp_path / "nothing")
    path = make_vq_dir(tmp_path / "vq")
    cfg = get_recipe("debug").override(
        ["data.image_repr=tokens", f"model.vq={path}", "model.vocab_sizes=image:64"]
    )
    with pytest.raises(ConfigError, match="model.vocab_sizes=image:32"):
        load_image_tokenizer(cfg.model, 16)


def test_cli_train_vq(tmp_path, capsys):
    out = tmp_path / "vq"
    assert (
        main(
            [
                "train-vq",
                "--dataset",
                "shapes",
                "--out",
                str(out),
                "--steps",
                "4",
                "--image-size",
                "16",
                "--batch-size",
                "4",
                "--codebook-size",
                "16",
                "--channels",
                "8",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["codes_per_image"] == 16 and 1 <= metrics["perplexity"] <= 16 and metrics["psnr"] > 0
    assert load_vq(out).vocab_size == 16 and "val: psnr" in capsys.readouterr().out
    assert main(["train-vq", "--out", str(out), "--downsample", "3"]) == 2
