"""The U-Net patcher: shapes, that skips and timesteps reach the output, gradients, training, caching."""

import pytest
import torch

from motfusion.data.pipeline import make_packer
from motfusion.errors import ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.models.unet import ResBlock, Skips, UNetPatcher
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.sampling import Generator, SampleConfig
from motfusion.training.trainer import build_optimizer, train_step

UNET = ["model.patcher=unet", "model.unet_channels=8", "model.unet_pooled=true"]  # as the demo recipe


def patcher(
    k: int, dim: int = 16, blocks: int = 1, pooled: bool = False, fold: int = 1, local: bool = False
) -> UNetPatcher:
    """A small U-Net whose output conv is random (the model zero-initialises it), so everything shows."""
    torch.manual_seed(k)
    u = UNetPatcher(
        channels=3, patch_size=k, dim=dim, width=8, blocks=blocks, pooled=pooled, fold=fold, local=local
    )
    torch.nn.init.normal_(u.proj_out.weight, std=0.1)
    return u


def run(u: UNetPatcher, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """embed then predict, with the tokens standing in for the backbone's output."""
    tokens, skips = u.embed(x, t)
    return u.predict(tokens, x.shape[2], x.shape[3], skips)


@pytest.mark.parametrize(
    "H, W, k, fold",
    [
        (16, 16, 2, 1),
        (32, 32, 4, 1),
        (64, 64, 8, 1),
        (32, 16, 8, 1),
        (16, 32, 4, 1),
        (8, 8, 1, 1),
        (32, 32, 8, 2),
        (32, 16, 8, 4),
        (16, 16, 4, 4),
    ],
)
def test_shapes_and_tokens_per_image(H, W, k, fold):
    u = patcher(k, blocks=2, fold=fold)
    x, t = torch.randn(2, 3, H, W), torch.tensor([10.0, 900.0])
    tokens, skips = u.embed(x, t)
    assert tokens.shape == (2, u.tokens_per_image(H, W), 16) and u.tokens_per_image(H, W) == (H // k) * (
        W // k
    )
    assert u.levels == (k // fold).bit_length() - 1  # model.unet_fold drops the levels finer than H / fold
    assert [f.shape[-2:] for f in skips.features] == [
        (H // fold >> i, W // fold >> i) for i in range(u.levels)
    ]
    assert u.predict(tokens, H, W, skips).shape == x.shape


def test_folded_unet_sees_and_draws_every_pixel():
    """With model.unet_fold=2 every pixel of a 2x2 block enters through its own channel and leaves
    through its own output channel: perturbing any one input pixel moves the output at all four
    positions of its block, and in each of the three color channels."""
    u = patcher(8, fold=2).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500.0])
    with torch.no_grad():
        ref = run(u, x, t)
        for dy in (0, 1):
            for dx in (0, 1):
                moved = x.clone()
                moved[0, 1, 6 + dy, 6 + dx] += 1.0
                block = (run(u, moved, t) - ref)[0, :, 6:8, 6:8].abs()  # (C, 2, 2)
                assert (block > 1e-5).all(), f"pixel offset ({dy}, {dx}) is lost in the fold"


def test_every_skip_reaches_the_output():
    """Perturbing the down path's activation at any resolution changes the prediction."""
    u = patcher(8)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        tokens, skips = u.embed(x, t)
        ref = u.predict(tokens, 32, 32, skips)
        for i in range(u.levels):
            features = list(skips.features)
            features[i] = features[i] + torch.randn_like(features[i])
            out = u.predict(tokens, 32, 32, Skips(features, skips.time))
            assert (out - ref).abs().max() > 1e-3, f"the skip at level {i} is ignored"
        assert (u.predict(tokens + 1, 32, 32, skips) - ref).abs().max() > 1e-3  # and the backbone's output


def test_timestep_conditions_both_paths():
    u = patcher(4)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens_a, skips_a = u.embed(x, torch.tensor([10.0, 10.0]))
        tokens_b, skips_b = u.embed(x, torch.tensor([700.0, 700.0]))
        assert (tokens_a - tokens_b).abs().max() > 1e-3
        # Same tokens and down-path features, another timestep: the up path's blocks read t too.
        moved = Skips(skips_a.features, skips_b.time)
        assert (u.predict(tokens_a, 16, 16, skips_a) - u.predict(tokens_a, 16, 16, moved)).abs().max() > 1e-3


def test_pooled_conditioning_is_an_added_path():
    """model.unet_pooled adds the mean hidden state to the up blocks' conditioning: with that layer at
    zero it is the plain U-Net exactly; otherwise the pooled state moves every up block."""
    plain, pooled = patcher(8), patcher(8, pooled=True)
    pooled.load_state_dict(plain.state_dict(), strict=False)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        tokens, skips = plain.embed(x, t)
        torch.nn.init.zeros_(pooled.pooled.weight)
        torch.nn.init.zeros_(pooled.pooled.bias)
        torch.testing.assert_close(
            pooled.predict(tokens, 32, 32, skips), plain.predict(tokens, 32, 32, skips), rtol=0, atol=0
        )
        torch.nn.init.normal_(pooled.pooled.weight, std=0.1)
        moved = pooled.predict(tokens, 32, 32, skips) - plain.predict(tokens, 32, 32, skips)
        assert (moved.abs().flatten(1).max(dim=1).values > 1e-3).all()


def test_conditioning_per_region_acts_on_its_own_pixels():
    """A ResBlock given one conditioning per cell of a 2x2 grid computes, inside each cell's 8x8 pixels
    (one pixel in from the cell's border, where the second 3x3 convolution sees only that cell), what
    it computes with that cell's conditioning for the whole image."""
    torch.manual_seed(0)
    block, x, time = ResBlock(4, 6, time_dim=8), torch.randn(2, 4, 16, 16), torch.randn(2, 8, 2, 2)
    with torch.no_grad():
        torch.nn.init.normal_(block.time.weight)  # large, so that a wrong cell shows
        regional = block(x, time)
        for i in range(2):
            for j in range(2):
                whole = block(x, time[:, :, i, j])
                inner = (slice(None), slice(None), slice(8 * i + 1, 8 * i + 7), slice(8 * j + 1, 8 * j + 7))
                torch.testing.assert_close(regional[inner], whole[inner], rtol=1e-5, atol=1e-5)
                assert (regional - whole).abs().max() > 1e-2  # the other cells differ


def test_local_conditioning_is_the_pooled_path_per_patch():
    """model.unet_local is model.unet_pooled's path taken per patch: when every patch holds the same
    hidden state the two give the same image, and with the layer at zero it is the plain U-Net."""
    plain, pooled, local = patcher(8), patcher(8, pooled=True), patcher(8, local=True)
    pooled.load_state_dict(plain.state_dict(), strict=False)
    local.load_state_dict(plain.state_dict(), strict=False)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        tokens, skips = plain.embed(x, t)
        same = tokens[:, :1].expand_as(tokens)  # (N, L, D), one state repeated over the patches
        torch.nn.init.normal_(local.local.weight, std=0.1)
        pooled.pooled.load_state_dict(local.local.state_dict())
        torch.testing.assert_close(
            local.predict(same, 32, 32, skips), pooled.predict(same, 32, 32, skips), rtol=1e-5, atol=1e-5
        )
        assert (
            local.predict(tokens, 32, 32, skips) - pooled.predict(tokens, 32, 32, skips)
        ).abs().max() > 1e-3
        torch.nn.init.zeros_(local.local.weight)
        torch.nn.init.zeros_(local.local.bias)
        torch.testing.assert_close(
            local.predict(tokens, 32, 32, skips), plain.predict(tokens, 32, 32, skips), rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize(
    "pooled, fold, local", [(False, 1, False), (True, 1, False), (True, 2, False), (True, 2, True)]
)
def test_gradient_reaches_every_parameter(pooled, fold, local):
    u = patcher(4, blocks=2, pooled=pooled, fold=fold, local=local)
    run(u, torch.randn(2, 3, 16, 16), torch.tensor([10.0, 900.0])).pow(2).mean().backward()
    silent = [n for n, p in u.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not silent


@pytest.mark.parametrize("fold, local", [(1, False), (2, True)])
def test_channels_last_storage_equals_contiguous(fold, local):
    """The U-Net keeps its activations channels last for speed; outputs and gradients are those of
    the same weights on standard NCHW storage, and what it hands out is contiguous (the tokens
    come out of channels-last features without a copy)."""
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 900.0])
    results = []
    for memory_format in (torch.channels_last, torch.contiguous_format):
        u = patcher(8, blocks=2, pooled=True, fold=fold, local=local)
        u.memory_format = memory_format
        tokens, skips = u.embed(x, t)
        out = u.predict(tokens.tanh(), 16, 16, skips)
        assert out.is_contiguous() and (tokens.is_contiguous() or memory_format != torch.channels_last)
        out.pow(2).mean().backward()
        results.append((tokens, out, {n: p.grad for n, p in u.named_parameters()}))
    (tokens, out, grads), (tokens_ref, out_ref, grads_ref) = results
    torch.testing.assert_close(tokens, tokens_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_batched_equals_one_by_one():
    """Images in a batch do not see each other (GroupNorm normalises per image)."""
    u = patcher(4).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5.0, 300.0, 999.0])
    with torch.no_grad():
        batched = run(u, x, t)
        for i in range(3):
            torch.testing.assert_close(
                run(u, x[i : i + 1], t[i : i + 1]), batched[i : i + 1], atol=1e-5, rtol=1e-5
            )


def test_model_starts_at_zero_and_trains(tok):
    cfg = get_recipe("debug").override(
        [*UNET, "train.batch_size=2", "train.seq_len=128", "train.weight_decay=0"]
    )
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size)
    assert isinstance(model.image, UNetPatcher)
    batch = make_packer(cfg, tok).next_batch()
    objective = TransfusionObjective(cfg.objective)
    with torch.no_grad():
        assert model(batch, batch.images, torch.zeros(len(batch.images))).image.abs().max() == 0
    optimizer = build_optimizer(model, cfg.train)
    history = [
        train_step(model, objective, optimizer, batch, torch.Generator().manual_seed(0), 3e-3, 1.0)
        for _ in range(8)
    ]
    assert history[-1]["loss/image"] < 0.85 * history[0]["loss/image"]


def test_cached_sampling_equals_recompute(tok):
    cfg = get_recipe("debug").override(UNET)
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size).eval()
    torch.nn.init.normal_(model.image.proj_out.weight, std=0.05)
    prompts = ["a red circle", "two blue squares on the left"]
    images = [
        Generator(model, tok, cfg.objective, 16, SampleConfig(steps=2, guidance=2.0, use_cache=c)).images(
            prompts, torch.Generator().manual_seed(0)
        )
        for c in (True, False)
    ]
    torch.testing.assert_close(images[0], images[1], atol=1e-4, rtol=1e-4)
    assert images[0].std() > 0.05


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.patcher=conv", "model.patcher"),
        ("model.patch_size=12", "power of 2"),
        ("model.unet_blocks=0", "model.unet_blocks"),
        ("model.unet_fold=3", "model.unet_fold"),
        ("model.unet_fold=8", "model.unet_fold"),
    ],
)
def test_bad_unet_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        get_recipe("debug").override(["model.patcher=unet", "data.image_size=48", override])
