"""Image autoencoders: the KL-VAE, the diffusers-format loader, and VAE latents as the image representation."""

import json
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch.distributions import Normal, kl_divergence

from motfusion.cli import main
from motfusion.codecs.diffusers_vae import load_diffusers_vae
from motfusion.codecs.image import Latents, apply_image_repr
from motfusion.codecs.vae import (
    LatentCodec,
    VAEConfig,
    build_vae,
    load_trained_vae,
    load_vae,
    save_vae,
)
from motfusion.data.pipeline import DocumentStream, build_dataset, image_dataset, make_packer
from motfusion.errors import ConfigError
from motfusion.recipes import get_recipe
from motfusion.sequence import Image
from motfusion.tokenizer import ByteTokenizer
from motfusion.training.checkpoint import load_config
from motfusion.training.vae import (
    image_batch,
    latent_scale,
    psnr,
    train_step,
    vae_loss,
)

TINY = dict(channels=8, norm_groups=4, image_size=16, batch_size=8, val_images=8, scale_images=16)


def tiny(**overrides) -> VAEConfig:
    return VAEConfig(**{**TINY, **overrides}).validate()


# ---- the KL-VAE --------------------------------------------------------------------------------


@pytest.mark.parametrize("downsample,latent_channels", [(4, 4), (8, 8)])
def test_round_trip_shapes(downsample, latent_channels):
    cfg = tiny(downsample=downsample, latent_channels=latent_channels, attention=True, image_size=32)
    model = build_vae(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = model.encode(x)
    side = 32 // downsample
    assert posterior.mean.shape == posterior.logvar.shape == (2, latent_channels, side, side)
    assert model.decode(posterior.sample()).shape == (2, 3, 32, 32)
    assert len(cfg.widths) == int(math.log2(downsample)) + 1 and model.cfg.downsample == downsample


def test_config_overrides_parse_and_name_bad_keys():
    cfg = VAEConfig().override(
        ["channels=32", "channel_mult=1,2,4", "attention=true", "kl_weight=1e-6", "loss=l1"]
    )
    assert cfg.widths == (32, 64, 128) and cfg.attention and cfg.kl_weight == 1e-6 and cfg.loss == "l1"
    with pytest.raises(ConfigError, match="latent_chanels"):
        VAEConfig().override(["latent_chanels=8"])
    with pytest.raises(ConfigError, match="downsample=6"):
        VAEConfig().override(["downsample=6"])
    with pytest.raises(ConfigError, match="channel_mult needs 4 entries"):
        VAEConfig().override(["downsample=8", "channel_mult=1,2"])


def _fit(cfg: VAEConfig, x: torch.Tensor, steps: int) -> list[dict[str, float]]:
    torch.manual_seed(0)
    model = build_vae(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    return [
        train_step(model, optimizer, x, cfg, torch.Generator().manual_seed(0), cfg.lr) for _ in range(steps)
    ]


def test_training_lowers_reconstruction_and_kl():
    cfg = tiny(lr=3e-3)
    x = image_batch(image_dataset(cfg.dataset, cfg.image_size, "train"), list(range(4)), cfg.image_size)
    history = _fit(cfg, x, 15)
    assert history[-1]["recon"] < 0.5 * history[0]["recon"]
    # With the KL term in charge, the posterior moves toward the prior.
    history = _fit(tiny(lr=3e-3, kl_weight=100.0), x, 15)
    assert history[-1]["kl"] < 0.5 * history[0]["kl"]


def test_psnr_matches_hand_computed_values():
    black = -torch.ones(3, 3, 4, 4)
    other = black.clone()
    other[0] += 0.2  # 0.1 on the [0, 1] scale everywhere: MSE 0.01 -> 20 dB
    other[1, :, :2] = 1.0  # half the pixels off by the full range: MSE 0.5 -> 10 log10(2) dB
    scores = psnr(other, black)
    assert scores[0].item() == pytest.approx(20.0, abs=1e-4)
    assert scores[1].item() == pytest.approx(10 * math.log10(2), abs=1e-4)
    assert math.isinf(scores[2].item())
    assert torch.equal(psnr(black, other), scores)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    cfg = tiny(attention=True, scale_factor=0.7)
    torch.manual_seed(0)
    model = build_vae(cfg).eval()
    save_vae(tmp_path, model, cfg)
    loaded, loaded_cfg = load_trained_vae(tmp_path)
    assert loaded_cfg == cfg
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).mean, model.encode(x).mean)
        assert torch.equal(loaded.decode(model.encode(x).mean), model.decode(model.encode(x).mean))
    codec = load_vae(tmp_path)
    assert codec.scale == 0.7 and torch.equal(codec.encode(x), 0.7 * model.encode(x).mean.detach())


def test_latent_scale_factor_gives_unit_std():
    cfg = tiny()
    torch.manual_seed(0)
    model = build_vae(cfg).eval()
    dataset = image_dataset(cfg.dataset, cfg.image_size, "train")
    scale = latent_scale(model, dataset, cfg, torch.device("cpu"))
    latents = LatentCodec(model, scale).encode(
        image_batch(dataset, list(range(cfg.scale_images)), cfg.image_size)
    )
    assert latents.std().item() == pytest.approx(1.0, abs=1e-5)
    assert scale != pytest.approx(1.0, abs=1e-2)  # the raw latents were not already unit-scale


# ---- the diffusers format ----------------------------------------------------------------------

DIFFUSERS_CONFIG = {  # the layout of Stable Diffusion's vae/config.json, at a tiny size
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0",
    "act_fn": "silu",
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 16,
    "scaling_factor": 0.5,
    "force_upcast": True,
}


def diffusers_tensor_shapes(block_out: list[int], layers: int, latent: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a diffusers AutoencoderKL file, named as diffusers names them (written from its naming
    scheme, independently of motfusion's modules)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def affine(name, c, cin=None):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = ((c,) if cin is None else (c, cin)), (c,)

    def resnet(name, cin, cout):
        affine(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        affine(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cin, cout, 1)

    def mid(name, c):
        resnet(f"{name}.resnets.0", c, c)
        resnet(f"{name}.resnets.1", c, c)
        affine(f"{name}.attentions.0.group_norm", c)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            affine(f"{name}.attentions.0.{proj}", c, c)

    conv("encoder.conv_in", 3, block_out[0], 3)
    cin = block_out[0]
    for i, c in enumerate(block_out):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
        cin = c
        if i < len(block_out) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    mid("encoder.mid_block", block_out[-1])
    affine("encoder.conv_norm_out", block_out[-1])
    conv("encoder.conv_out", block_out[-1], 2 * latent, 3)
    rev = block_out[::-1]
    conv("decoder.conv_in", latent, rev[0], 3)
    mid("decoder.mid_block", rev[0])
    cin = rev[0]
    for i, c in enumerate(rev):
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
        cin = c
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    affine("decoder.conv_norm_out", rev[-1])
    conv("decoder.conv_out", rev[-1], 3, 3)
    conv("quant_conv", 2 * latent, 2 * latent, 1)
    conv("post_quant_conv", latent, latent, 1)
    return shapes


@pytest.fixture
def diffusers_dir(tmp_path):
    """A randomly initialised diffusers-format VAE directory: config.json + diffusion_pytorch_model.safetensors."""
    g = torch.Generator().manual_seed(0)
    shapes = diffusers_tensor_shapes(DIFFUSERS_CONFIG["block_out_channels"], 1, 4)
    tensors = {
        k: 0.3 * torch.randn(s, generator=g) + (1.0 if k.endswith(("norm1.weight", "norm2.weight")) else 0.0)
        for k, s in shapes.items()
    }
    (tmp_path / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG))
    safetensors.torch.save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    return tmp_path, tensors


def test_diffusers_checkpoint_loads_strictly_and_round_trips(diffusers_dir):
    path, tensors = diffusers_dir
    model = load_diffusers_vae(path)
    state = model.state_dict()
    assert set(state) == set(tensors)
    assert all(torch.equal(state[k], v) for k, v in tensors.items())
    codec = load_vae(path)
    assert codec.scale == 0.5 and codec.downsample == 2 and codec.latent_channels == 4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8) and codec.decode(z).shape == (2, 3, 16, 16)


def test_diffusers_checkpoint_with_a_wrong_key_is_refused(diffusers_dir):
    path, tensors = diffusers_dir
    tensors["encoder.conv_in.extra"] = tensors.pop("encoder.conv_in.bias")
    safetensors.torch.save_file(tensors, path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing \['encoder.conv_in.bias'\].*unexpected \['encoder.conv_in.extra'\]"
    ):
        load_diffusers_vae(path)


def test_legacy_attention_names_load_to_the_same_model(diffusers_dir):
    path, tensors = diffusers_dir
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in tensors.items():
        for new, old in renames.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    safetensors.torch.save_file(legacy, path / "diffusion_pytorch_model.safetensors")
    state = load_diffusers_vae(path).state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors.items())


def test_encoder_downsampling_pads_right_and_bottom_only(diffusers_dir):
    path, tensors = diffusers_dir
    down = load_diffusers_vae(path).encoder.down_blocks[0].downsamplers[0]
    w, b = (
        tensors["encoder.down_blocks.0.downsamplers.0.conv.weight"],
        tensors["encoder.down_blocks.0.downsamplers.0.conv.bias"],
    )
    x = torch.randn(2, 8, 8, 8)
    padded = torch.zeros(2, 8, 9, 9)
    padded[:, :, :8, :8] = x  # one zero row at the bottom, one zero column on the right
    expected = F.conv2d(padded, w, b, stride=2)
    with torch.no_grad():
        out = down(x)
    assert out.shape == (2, 8, 4, 4)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(
        out, F.conv2d(x, w, b, stride=2, padding=1), atol=1e-3
    )  # symmetric padding differs


def test_mid_block_attention_matches_a_reference_written_out(diffusers_dir):
    path, t = diffusers_dir
    attn = load_diffusers_vae(path).encoder.mid_block.attentions[0]
    p = "encoder.mid_block.attentions.0."
    x = torch.randn(2, 16, 3, 5)
    B, C, H, W = x.shape
    expected = torch.empty_like(x)
    for i in range(B):
        groups = x[i].reshape(4, -1)  # 4 groups of C/4 channels x H*W pixels
        normed = (groups - groups.mean(1, keepdim=True)) / torch.sqrt(
            groups.var(1, unbiased=False, keepdim=True) + 1e-6
        )
        h = (
            normed.reshape(C, H * W) * t[p + "group_norm.weight"][:, None] + t[p + "group_norm.bias"][:, None]
        ).T  # (HW, C)
        q, k, v = (h @ t[p + f"{n}.weight"].T + t[p + f"{n}.bias"] for n in ("to_q", "to_k", "to_v"))
        mixed = torch.softmax(q @ k.T / math.sqrt(C), dim=-1) @ v  # (HW, C)
        out = mixed @ t[p + "to_out.0.weight"].T + t[p + "to_out.0.bias"]
        expected[i] = x[i] + out.T.reshape(C, H, W)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


# ---- latents as the image representation -------------------------------------------------------


@pytest.fixture
def vae_dir(tmp_path):
    cfg = tiny(image_size=32, scale_factor=1.7)
    torch.manual_seed(0)
    save_vae(tmp_path / "vae", build_vae(cfg), cfg)
    return tmp_path / "vae"


def test_latents_need_a_vae_and_a_divisible_grid(vae_dir):
    with pytest.raises(ConfigError, match="needs model.vae"):
        get_recipe("debug").override(["data.image_repr=latents"])
    with pytest.raises(ConfigError, match="image_repr='voxels'"):
        get_recipe("debug").override(["data.image_repr=voxels"])
    cfg = get_recipe("debug").override(
        ["data.image_repr=latents", f"model.vae={vae_dir}"]
    )  # 16px -> 4x4 latents
    with pytest.raises(ConfigError, match="latent grid 4x4.*model.patch_size=8"):
        apply_image_repr(cfg.override(["model.patch_size=8", "data.image_size=16"]))
    assert apply_image_repr(cfg.override(["model.patch_size=2"])).model.image_channels == 4


def test_documents_carry_scaled_posterior_means_encoded_in_fixed_blocks(vae_dir, tok):
    cfg = apply_image_repr(
        get_recipe("debug").override(
            ["data.image_repr=latents", f"model.vae={vae_dir}", "data.image_size=32", "model.patch_size=2"]
        )
    )
    stream = DocumentStream(build_dataset(cfg, "train"), tok, cfg, "train")
    codec = load_vae(vae_dir)
    for i in (0, 1, DocumentStream.BLOCK - 1, DocumentStream.BLOCK):  # a block's images, encoded as one batch
        pixels = [s.pixels for s in stream.document(i) if isinstance(s, Image)]
        latents = torch.stack(stream(i).images)
        assert latents.shape == (len(pixels), 4, 8, 8)
        torch.testing.assert_close(latents, codec.encode(torch.stack(pixels)))
    first = stream(0).images
    stream(1)
    assert stream(0).images is first  # the block is kept, not encoded again
    # the same documents whatever the order of asking: what ranks and resumed runs rely on
    late = DocumentStream(build_dataset(cfg, "train"), tok, cfg, "train")
    for i in (2 * DocumentStream.BLOCK + 5, 3, 1):
        assert all(map(torch.equal, late(i).images, stream(i).images))
    batch_images = make_packer(cfg, tok).next_batch().images
    assert batch_images.shape[1:] == (4, 8, 8)


# train-vae in seconds: 2 steps of a narrow VAE, a few images for the scale and the PSNR.
TINY_VAE_ARGS = [
    "--steps",
    "2",
    "channels=8",
    "norm_groups=4",
    "batch_size=4",
    "val_images=4",
    "scale_images=8",
    "log_every=1",
]


def test_debug_recipe_on_latents_trains_and_generates_pixel_images(tmp_path, capsys):
    vae, run, samples = tmp_path / "vae", tmp_path / "run", tmp_path / "samples"
    assert main(["train-vae", "--dataset", "shapes", "--out", str(vae), *TINY_VAE_ARGS]) == 0
    records = [json.loads(line) for line in (vae / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2] and records[-1]["val_images"] == 4
    assert json.loads((vae / "config.json").read_text())["config"]["scale_factor"] == pytest.approx(
        records[-1]["scale_factor"]
    )
    assert (vae / "weights.safetensors").is_file()

    assert (
        main(
            [
                "train",
                "--recipe",
                "debug",
                "--out",
                str(run),
                "--steps",
                "3",
                "data.image_repr=latents",
                f"model.vae={vae}",
                "data.image_size=32",
                "model.patch_size=2",
                "train.device=cpu",
                "train.tensorboard=false",
            ]
        )
        == 0
    )
    assert load_config(run).model.image_channels == 4
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run),
                "--prompt",
                "a red circle",
                "--n",
                "2",
                "--steps",
                "2",
                "--out",
                str(samples),
            ]
        )
        == 0
    )
    pngs = sorted(samples.glob("*.png"))
    assert len(pngs) == 2 and PILImage.open(pngs[0]).size == (4 * 32, 4 * 32)  # pixels, shown 4x
    # Captioning takes pixels and encodes them; the latent model would reject 3-channel patches.
    assert main(["generate", "--ckpt", str(run), "--image", str(pngs[0]), "--max-tokens", "4"]) == 0
    assert str(pngs[0]) in capsys.readouterr().out


def test_generator_decodes_latents_to_pixels(vae_dir):
    from motfusion.models.transfusion import TransfusionModel
    from motfusion.sampling import Generator, SampleConfig

    cfg = apply_image_repr(
        get_recipe("debug").override(
            ["data.image_repr=latents", f"model.vae={vae_dir}", "data.image_size=32", "model.patch_size=2"]
        )
    )
    tok = ByteTokenizer()
    codec = load_vae(vae_dir)
    gen = Generator(
        TransfusionModel(cfg.model, tok.vocab_size),
        tok,
        cfg.objective,
        32,
        SampleConfig(steps=2, guidance=1.0),
        image=Latents(codec),
    )
    latents = gen.images(["a red circle"], torch.Generator().manual_seed(0))
    assert latents.shape == (1, 4, 8, 8) and gen.image_shape == (4, 8, 8)
    assert torch.equal(gen.decode_images(latents), codec.decode(latents))
    assert gen.decode_images(latents).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_vae_loss_weights_kl_per_pixel_value(loss):
    cfg = tiny(kl_weight=0.5, loss=loss)
    torch.manual_seed(0)
    model = build_vae(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    total, parts = vae_loss(model, x, cfg, torch.Generator().manual_seed(0))
    assert total.item() == pytest.approx(
        (parts["recon"] + 0.5 * parts["kl"] / (3 * 16 * 16)).item(), rel=1e-6
    )
    recon, posterior = model(x, torch.Generator().manual_seed(0))
    error = (recon - x).abs() if loss == "l1" else (recon - x).square()
    assert parts["recon"].item() == pytest.approx(error.mean().item(), rel=1e-6)
    prior_gap = kl_divergence(Normal(posterior.mean, (0.5 * posterior.logvar).exp()), Normal(0.0, 1.0))
    assert parts["kl"].item() == pytest.approx(prior_gap.sum(dim=(1, 2, 3)).mean().item(), rel=1e-5)
