"""Sampler equivalences: KV cache == full recomputation, batched == one by one, seeds reproduce."""

import pytest
import torch

from motfusion.models.transfusion import TransfusionModel
from motfusion.sampling import Context, Generator, SampleConfig, sample_token
from motfusion.sampling.generate import PICK_AT
from motfusion.sequence import Image, Text


@pytest.fixture
def model(cfg, tok):
    torch.manual_seed(0)
    m = TransfusionModel(cfg.model, tok.vocab_size)
    torch.nn.init.normal_(m.image.proj_out.weight, std=0.05)  # untrained but not trivially zero
    return m.eval()


def make(model, tok, cfg, **kw):
    opts = dict(steps=4, max_tokens=6, guidance=2.0)
    opts.update(kw)
    return Generator(model, tok, cfg.objective, 16, SampleConfig(**opts))


PROMPTS = ["a red circle", "two blue squares on the left", "x"]


def test_image_cache_equals_recompute(model, tok, cfg):
    a = make(model, tok, cfg, use_cache=True).images(PROMPTS, torch.Generator().manual_seed(0))
    b = make(model, tok, cfg, use_cache=False).images(PROMPTS, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert a.std() > 0.05


def test_image_cache_equals_recompute_with_2d_rope(tok, cfg):
    """model.rope_2d: the image positions of a cached denoising step get the same rows and columns as
    in a full recomputation."""
    cfg.model.rope_2d = True
    torch.manual_seed(0)
    m = TransfusionModel(cfg.model, tok.vocab_size)
    torch.nn.init.normal_(m.image.proj_out.weight, std=0.05)
    test_image_cache_equals_recompute(m.eval(), tok, cfg)


@torch.no_grad()
def test_text_cache_equals_recompute_logits(model, tok, cfg):
    """Step by step, the cached logits equal those of re-running the whole sequence."""
    gen = make(model, tok, cfg)
    prompt = [gen._encode([Text(p)]) for p in PROMPTS]
    ctxs = [Context(model, use_cache=True), Context(model, use_cache=False)]
    logits = [gen._logits(c.run(c.prompt(prompt, tok.pad))) for c in ctxs]
    for _ in range(5):
        torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
        ids = logits[0].argmax(-1)
        logits = [gen._logits(c.run(c.tokens(ids))) for c in ctxs]


def test_captions_cache_equals_recompute(model, tok, cfg):
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    a = make(model, tok, cfg, use_cache=True, temperature=0.8).captions(
        images, torch.Generator().manual_seed(1)
    )
    b = make(model, tok, cfg, use_cache=False, temperature=0.8).captions(
        images, torch.Generator().manual_seed(1)
    )
    assert a == b


def test_batched_equals_one_by_one(model, tok, cfg):
    gen = make(model, tok, cfg)  # DDIM and greedy decoding: no randomness after the initial noise
    x_T = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    batched = gen.images(PROMPTS, noise=x_T)
    for i, p in enumerate(PROMPTS):  # prompts of different lengths: left padding must not matter
        torch.testing.assert_close(
            gen.images([p], noise=x_T[i : i + 1]), batched[i : i + 1], atol=1e-4, rtol=1e-4
        )
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    assert gen.captions(images) == [gen.captions(images[i : i + 1])[0] for i in range(3)]


def test_same_seed_same_output(model, tok, cfg):
    gen = make(model, tok, cfg, sampler="ddpm", temperature=1.0, top_p=0.9)
    a = gen.images(PROMPTS[:2], torch.Generator().manual_seed(7))
    b = gen.images(PROMPTS[:2], torch.Generator().manual_seed(7))
    c = gen.images(PROMPTS[:2], torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert gen.captions(images, torch.Generator().manual_seed(3)) == gen.captions(
        images, torch.Generator().manual_seed(3)
    )


def test_interleaved_switches_to_diffusion_on_boi(model, tok, cfg):
    """Force the model to emit BOI first: an image follows, then EOI is appended and text resumes."""
    gen = make(model, tok, cfg, max_tokens=3)
    calls = {"n": 0}

    def steer(logits):
        calls["n"] += 1
        out = torch.full_like(logits, -1e9)
        out[:, tok.boi if calls["n"] == 1 else ord("z") if calls["n"] < 3 else tok.eos] = 0
        return out

    gen._logits = lambda o, f=gen._logits: steer(f(o))
    segments = gen.interleaved("draw:", torch.Generator().manual_seed(0))
    kinds = [type(s).__name__ for s in segments]
    assert kinds == ["Text", "Image", "Text"] and segments[2].text == "z"
    assert segments[1].pixels.shape == (3, 16, 16)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, 1.0, 0.7, g).item() for _ in range(200)}
    assert draws == {0, 1}
    assert sample_token(logits, 0.0, 1.0, None).item() == 0


@torch.no_grad()
def token_by_token_log_prob(gen: Generator, segments: list, texts: list[str]) -> torch.Tensor:
    """The reference of caption_log_prob: the cached decoder reads each caption one token at a time
    after its image alone; the sum of log p over the caption's tokens and EOS."""
    want = []
    for segment, text in zip(segments, texts):
        ctx = Context(gen.model, use_cache=True)
        logits = gen._logits(ctx.run(ctx.prompt([gen._encode([segment])], gen.tok.pad)))
        total = 0.0
        for i in [*gen.tok.encode(text), gen.tok.eos]:
            total += logits.log_softmax(-1)[0, i].item()
            logits = gen._logits(ctx.run(ctx.tokens(torch.tensor([i]))))
        want.append(total)
    return torch.tensor(want)


def test_caption_log_prob_equals_token_by_token(model, tok, cfg):
    """One padded pass scores each caption as the cached decoder reads it."""
    gen = make(model, tok, cfg)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    texts = ["a red circle", "xy", "two blue squares on the left"]  # lengths differ: padding
    want = token_by_token_log_prob(gen, [Image(im) for im in images], texts)
    torch.testing.assert_close(gen.caption_log_prob(images, texts), want, atol=1e-4, rtol=1e-5)


def test_best_of_finishes_the_candidate_that_reads_best_early(model, tok, cfg):
    """best_of k draws prompts * k as one batch from the same random stream, compares the clean images
    they predict at the pick step by caption_log_prob, and finishes the best alone: the picture equals
    that candidate run to the end with all the others (DDIM: no randomness after the noise)."""
    k, B, steps = 3, len(PROMPTS), 8
    got = make(model, tok, cfg, best_of=k, steps=steps).images(PROMPTS, torch.Generator().manual_seed(0))
    one = make(model, tok, cfg, steps=steps)
    noise = torch.randn((k * B, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    every = one.images(PROMPTS * k, noise=noise).view(k, B, 3, 16, 16)
    ctx, uncond = one.guided_prompt(PROMPTS * k)
    _, x0 = one._steps(ctx, uncond, one._make_sampler(), noise, range(int(steps * PICK_AT) + 1), None)
    best = one.caption_log_prob(x0, PROMPTS * k).view(k, B).argmax(0)
    assert best.tolist() != [0] * B  # the choice is not simply the first draw
    torch.testing.assert_close(got, every[best, torch.arange(B)], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="best_of=1"):
        make(model, tok, cfg, best_of=k).images(PROMPTS, noise=torch.zeros(B, 3, 16, 16))


def test_best_of_runs_no_unconditional_rows_while_the_early_scale_is_one(model, tok, cfg, monkeypatch):
    """With guidance_early=1 the candidates' steps (up to the comparison) do not guide, so they run
    k B rows, not 2 k B; the picture equals the one drawn with those rows present (scale 1 ignores
    them), and the steps after the comparison still guide."""
    k, B, steps = 3, len(PROMPTS), 8
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].tokens.shape[0]))
    try:
        draw = lambda: make(model, tok, cfg, best_of=k, steps=steps, guidance_early=1.0).images(
            PROMPTS, torch.Generator().manual_seed(0)
        )
        got, seen = draw(), set(rows)
        rows.clear()
        monkeypatch.setattr(Generator, "_guides", lambda self, steps, n: True)  # rows for every phase
        want, seen_all = draw(), set(rows)
    finally:
        hook.remove()
    assert 2 * k * B not in seen and 2 * k * B in seen_all and 2 * B in seen
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(
        got,
        make(model, tok, cfg, best_of=k, steps=steps, guidance_early=1.0, guidance=1.0).images(
            PROMPTS, torch.Generator().manual_seed(0)
        ),
    )
