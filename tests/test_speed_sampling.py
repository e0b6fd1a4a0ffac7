"""Classifier-free guidance in one batch: the conditional and unconditional rows share each forward
pass, and the images equal those of two separate contexts."""

import pytest
import torch
from test_vq import make_vq_dir

from motfusion.codecs.image import image_repr
from motfusion.errors import ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.recipes import get_recipe
from motfusion.sampling import Context, Generator, SampleConfig
from motfusion.sequence import Text

PROMPTS = ["a red circle", "two blue squares on the left", "x"]


@pytest.fixture
def model(cfg, tok):
    torch.manual_seed(0)
    m = TransfusionModel(cfg.model, tok.vocab_size)
    torch.nn.init.normal_(m.image.proj_out.weight, std=0.05)  # untrained but not trivially zero
    return m.eval()


def generator(model, tok, cfg, **kw):
    return Generator(model, tok, cfg.objective, 16, SampleConfig(**{"steps": 4, "guidance": 3.0, **kw}))


def separate_contexts(gen, prompts, noise):
    """The reference: the prompts' context and an unconditional one, each run on its own."""
    ctx = Context(gen.model, gen.cfg.use_cache)
    ctx.run(ctx.prompt([gen._encode([Text(p)], then=[gen.tok.boi]) for p in prompts], gen.tok.pad))
    return gen.denoise(ctx, gen._unconditional(len(prompts)), len(prompts), None, noise)


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_guidance_equals_two_contexts(model, tok, cfg, use_cache):
    gen = generator(model, tok, cfg, use_cache=use_cache)
    noise = torch.randn(len(PROMPTS), *gen.image_shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        gen.images(PROMPTS, noise=noise), separate_contexts(gen, PROMPTS, noise), atol=1e-5, rtol=1e-5
    )


@torch.no_grad()
def test_each_denoising_step_is_one_forward_pass(model, tok, cfg):
    gen = generator(model, tok, cfg)
    rows = []
    hook = model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    gen.images(PROMPTS[:2], torch.Generator().manual_seed(0))
    hook.remove()
    assert rows == [4] * (1 + gen.cfg.steps)  # the prompts, then one pass of 2B rows per step


@torch.no_grad()
@pytest.mark.parametrize("scales", [(5.0, 2.0), (3.0, 1.0), (1.0, 3.0)])
def test_guidance_early_guides_the_steps_up_to_the_best_of_comparison(model, tok, cfg, scales):
    """guidance_early over steps 0..int(n PICK_AT) (0 and 1 of 4), guidance after; equal to running those
    steps with one scale and the rest with the other, from the same noise and context. With either
    scale at 1 the unconditional rows are still run for the other."""
    early, late = scales
    gen = generator(model, tok, cfg, guidance=late, guidance_early=early)
    noise = torch.randn(2, *gen.image_shape, generator=torch.Generator().manual_seed(0))
    got = gen.images(PROMPTS[:2], noise=noise)
    first, second = generator(model, tok, cfg, guidance=early), generator(model, tok, cfg, guidance=late)
    ctx, uncond = gen.guided_prompt(PROMPTS[:2])  # with unconditional rows, whichever scale is 1
    sampler = first._make_sampler()
    x, _ = first._steps(ctx, uncond, sampler, noise, range(2), None)
    x, _ = second._steps(ctx, uncond, sampler, x, range(2, 4), None)
    assert torch.equal(got, x.clamp(-1, 1))
    one_scale = generator(model, tok, cfg, guidance=late).images(PROMPTS[:2], noise=noise)
    assert not torch.allclose(got, one_scale)


def test_guidance_early_must_be_finite():
    with pytest.raises(ConfigError, match="objective.guidance_early=nan"):
        get_recipe("debug").override(["objective.guidance_early=nan"])


@torch.no_grad()
def test_no_guidance_runs_no_unconditional_rows(model, tok, cfg):
    gen = generator(model, tok, cfg, guidance=1.0)
    rows = []
    hook = model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    gen.images(PROMPTS[:2], torch.Generator().manual_seed(0))
    hook.remove()
    assert rows == [2] * (1 + gen.cfg.steps)


@torch.no_grad()
def test_batched_guidance_equals_two_contexts_for_vq_codes(tok, tmp_path):
    """Images as VQ codes: guided logits from one batch equal those of two contexts (greedy codes)."""
    vq_dir = make_vq_dir(tmp_path / "vq")
    cfg = get_recipe("debug").override(
        ["data.image_repr=tokens", f"model.vq={vq_dir}", "model.vocab_sizes=image:32"]
    )
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size).eval()
    gen = Generator(
        model, tok, cfg.objective, 16, SampleConfig(guidance=2.0, temperature=0.0), image=image_repr(cfg)
    )
    ctx = Context(model, True)
    ctx.run(ctx.prompt([gen._encode([Text(p)], then=[tok.boi]) for p in PROMPTS], tok.pad))
    reference = gen.span(ctx, gen._unconditional(len(PROMPTS)), "image", None, length=gen.tokens_per_image)
    batched, uncond = gen.guided_prompt(PROMPTS)
    assert uncond is batched
    assert gen.span(batched, uncond, "image", None, length=gen.tokens_per_image) == reference
