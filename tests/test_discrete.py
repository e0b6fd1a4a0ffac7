"""Discrete modalities: span encoding and targets, per-modality tables and heads, the loss breakdown,
tower groupings with three modalities, the Chameleon setting end to end, and its samplers."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_mot import copy_dense_into_towers
from test_sampling import token_by_token_log_prob
from test_vq import make_vq_dir

from motfusion.codecs.image import image_repr
from motfusion.errors import ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import GlobalBatch, TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.sampling import Context, Generator, SampleConfig
from motfusion.sequence import (
    IGNORE,
    IMAGE,
    SPAN_END,
    SPEECH,
    TEXT,
    Image,
    Text,
    Units,
    collate,
    encode_document,
)
from motfusion.tokenizer import ByteTokenizer
from motfusion.training.logging import read_metrics
from motfusion.training.trainer import train

I = IGNORE
THREE = [
    "model.vocab_sizes=image:32,speech:12",
    "model.towers=text:text,image:image,speech:speech",
    "data.image_repr=tokens",
    "model.vq=unused",
]


def three_modal(cfg, **changes):
    """The debug model with images as 32 codes and speech as 12 units, one tower each."""
    torch.manual_seed(0)
    return TransfusionModel(
        dataclasses.replace(cfg.override(THREE).model, **changes), ByteTokenizer().vocab_size
    )


def mixed_docs(rng: torch.Generator) -> list[list]:
    def units(modality: str, vocab: int, n: int) -> Units:
        return Units(modality, torch.randint(vocab, (n,), generator=rng))

    return [
        [Text("ab"), units("image", 32, 16), Text("c")],
        [units("speech", 12, 7), Text("de")],
        [Text("f"), units("speech", 12, 5), units("image", 32, 16)],
    ]


def mixed_batch(tok, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    docs = [encode_document(d, tok, 4) for d in mixed_docs(rng)]
    return collate([docs[:2], docs[2:]], 64, tok.pad)


HAND_BUILT = [Text("a"), Units("image", [5, 6]), Units("speech", [0, 3]), Text("b")]


def test_spans_encode_with_markers_local_ids_and_per_head_targets(tok):
    enc = encode_document(HAND_BUILT, tok, 4)
    S = tok.special_ids
    assert enc.tokens == [tok.bos, 97, tok.boi, 5, 6, tok.eoi, S["<bosp>"], 1, 4, S["<eosp>"], 98, tok.eos]
    assert enc.modality == [TEXT] * 3 + [IMAGE] * 2 + [TEXT] * 2 + [SPEECH] * 2 + [TEXT] * 3
    b = collate([[enc]], len(enc), tok.pad)
    # BOI -> first code (image head); the last code's EOI is appended, not predicted; <bosp> -> unit 0
    # (local id 1); the last unit predicts the end of its span (SPAN_END, speech head); <eosp> -> text.
    assert b.targets[0].tolist() == [97, tok.boi, 5, 6, I, S["<bosp>"], 1, 4, SPAN_END, 98, tok.eos, I]
    assert {m: idx.tolist() for m, idx in b.loss_index.items()} == {
        "text": [0, 1, 5, 9, 10],
        "image": [2, 3],
        "speech": [6, 7, 8],
    }


def test_continuous_image_next_to_units_keeps_its_rules(tok):
    enc = encode_document([Text("a"), Image(torch.zeros(3, 8, 8)), Units("speech", [2])], tok, 4)
    b = collate([[enc]], len(enc), tok.pad)
    S = tok.special_ids
    # No loss on BOI (the next positions are diffusion patches), on the patches, or on the EOI.
    assert b.targets[0].tolist() == [97, tok.boi, I, I, I, I, I, S["<bosp>"], 3, SPAN_END, tok.eos, I]
    assert b.loss_index["speech"].tolist() == [8, 9]


def test_bad_units_are_clear_errors(tok, cfg):
    with pytest.raises(ValueError, match="not a span modality"):
        encode_document([Units("text", [1])], tok, 4)
    with pytest.raises(ValueError, match="at least one id"):
        encode_document([Units("speech", [])], tok, 4)
    model = TransfusionModel(cfg.model, tok.vocab_size)  # no speech vocabulary
    b = collate([[encode_document([Units("speech", [1, 2])], tok, 4)]], 8, tok.pad)
    with pytest.raises(ValueError, match="model.vocab_sizes"):
        model(b, b.images, torch.zeros(0))
    with pytest.raises(ConfigError, match="model.towers"):
        cfg.override(["model.vocab_sizes=speech:10"])
    with pytest.raises(ConfigError, match="data.image_repr=tokens"):
        cfg.override(["model.vocab_sizes=image:10"])


def test_each_modality_has_its_own_table_and_head(tok, cfg):
    model = three_modal(cfg)
    b = mixed_batch(tok)
    assert model.image is None and model.logits(torch.zeros(2, 64), "speech").shape == (
        2,
        13,
    )  # 12 units + end
    names = ["text", "image", "speech"]
    expected = torch.stack(
        [model.adapter(names[m]).embed.weight[t] for m, t in zip(b.modality.flatten(), b.tokens.flatten())]
    )
    torch.testing.assert_close(model._embed_tokens(b).flatten(0, 1), expected)
    for m in ("image", "speech"):  # a modality's loss trains its own head and no other
        model.zero_grad()
        hidden = model(b, b.images, torch.zeros(0)).hidden
        TransfusionObjective.lm_loss(model, hidden, b, m, GlobalBatch.of(b)).backward()
        trained = {
            a
            for a in names
            if model.adapter(a).head.weight.grad is not None
            and model.adapter(a).head.weight.grad.abs().sum() > 0
        }
        assert trained == {m}


def test_loss_breakdown_equals_manual(tok, cfg):
    model = three_modal(cfg)
    enc = encode_document(HAND_BUILT, tok, 4)
    b = collate([[enc], [enc]], len(enc) + 3, tok.pad)
    obj = TransfusionObjective(dataclasses.replace(cfg.objective, loss_weights={"speech": 0.5}))
    loss, parts = obj(model, b)
    hidden = model(b, b.images, torch.zeros(0)).hidden  # (2, T, D)
    targets = b.targets
    rows = {"text": [0, 1, 5, 9, 10], "image": [2, 3], "speech": [6, 7, 8]}  # from the layout test above
    heads = {
        "text": model.text.head.weight,
        "image": model.discrete["image"].head.weight,
        "speech": model.discrete["speech"].head.weight,
    }
    manual = {
        m: F.cross_entropy((hidden[:, r] @ heads[m].T).flatten(0, 1), targets[:, r].flatten())
        for m, r in rows.items()
    }
    assert set(parts) == {"loss/text", "loss/image", "loss/speech"}
    for m, value in manual.items():
        torch.testing.assert_close(parts[f"loss/{m}"], value)
    torch.testing.assert_close(loss, manual["text"] + manual["image"] + 0.5 * manual["speech"])


@pytest.mark.parametrize("untie", [("ffn",), ("ffn", "attn", "norm")])
def test_tied_mot_equals_dense_with_three_modalities(tok, cfg, untie):
    b = mixed_batch(tok, seed=2)
    dense, mot = three_modal(cfg, untie=()), three_modal(cfg, untie=untie)
    copy_dense_into_towers(dense, mot)
    ref, out = dense(b, b.images, torch.zeros(0)).hidden, mot(b, b.images, torch.zeros(0)).hidden
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for m in ("text", "image", "speech"):
        torch.testing.assert_close(mot.logits(out, m), dense.logits(ref, m), atol=1e-5, rtol=1e-5)


def backbone_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone."))


def test_tower_groupings_parameter_counts(tok, cfg):
    dense = three_modal(cfg, untie=())
    ffn = sum(p.numel() for n, p in dense.named_parameters() if ".ffn." in n)
    for towers, n in [
        ({"text": "a", "image": "a", "speech": "b"}, 2),
        ({"text": "t", "image": "i", "speech": "s"}, 3),
    ]:
        full = three_modal(cfg, towers=towers)  # ffn, attn and norm untied: every backbone weight per tower
        assert backbone_params(full) == n * backbone_params(dense)
        assert (
            backbone_params(three_modal(cfg, towers=towers, untie=("ffn",)))
            == backbone_params(dense) + (n - 1) * ffn
        )
        assert full.num_params() - backbone_params(full) == dense.num_params() - backbone_params(dense)


def tower_grads(model, b, towers_of_interest):
    model.zero_grad()
    TransfusionObjective(get_recipe("debug").objective)(model, b)[0].backward()
    grads = {}
    for tower in towers_of_interest:
        named = [
            (n, p) for n, p in model.named_parameters() if f".{tower}." in n and n.startswith("backbone.")
        ]
        grads[tower] = {n.replace(f".{tower}.", ".*."): p.grad for n, p in named}
    return grads


def test_shared_tower_gets_gradients_from_both_modalities_and_a_third_none(tok, cfg):
    rng = torch.Generator().manual_seed(3)
    docs = [encode_document([Text("ab"), Units("image", torch.randint(32, (16,), generator=rng))], tok, 4)]
    b = collate([docs], 32, tok.pad)  # text and image codes, no speech
    shared = three_modal(cfg, towers={"text": "a", "image": "a", "speech": "b"})
    split = three_modal(cfg, towers={"text": "a", "image": "c", "speech": "b"})
    state = shared.state_dict()
    split.load_state_dict({n: state[n.replace(".c.", ".a.")] for n in split.state_dict()})  # c := a
    g_shared = tower_grads(shared, b, ["a", "b"])
    g_split = tower_grads(split, b, ["a", "c"])
    assert all(g is None for g in g_shared["b"].values()) and g_shared["b"] and g_shared["a"]
    for name, g in g_shared["a"].items():  # the shared tower's gradient is the sum of both copies'
        assert g_split["a"][name].abs().sum() > 0 and g_split["c"][name].abs().sum() > 0
        torch.testing.assert_close(g, g_split["a"][name] + g_split["c"][name], atol=1e-6, rtol=1e-4)
    b2 = mixed_batch(tok)  # with speech units: the third tower learns
    assert all(g is not None and g.abs().sum() > 0 for g in tower_grads(shared, b2, ["b"])["b"].values())


def test_tokens_mode_trains_the_debug_recipe(tok, tmp_path):
    vq_dir = make_vq_dir(tmp_path / "vq")
    cfg = get_recipe("debug").override(
        [
            "data.image_repr=tokens",
            f"model.vq={vq_dir}",
            "model.vocab_sizes=image:32",
            "train.steps=4",
            "train.log_every=1",
            "train.batch_size=2",
            "train.device=cpu",
        ]
    )
    result = train(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 4 and all(r["loss/image"] > 0 and r["loss/text"] > 0 for r in records)
    assert records[0]["tokens/image"] > 0 and result.step == 4
    bad = get_recipe("debug").override(
        ["data.image_repr=tokens", f"model.vq={vq_dir}", "model.vocab_sizes=image:30"]
    )
    with pytest.raises(ConfigError, match="image:32"):
        train(bad, tmp_path / "bad")


@pytest.fixture
def tokens_generator(tok, tmp_path):
    vq_dir = make_vq_dir(tmp_path / "vq")
    cfg = get_recipe("debug").override(
        [
            "data.image_repr=tokens",
            f"model.vq={vq_dir}",
            "model.vocab_sizes=image:32,speech:12",
            "model.towers=text:text,image:image,speech:speech",
        ]
    )
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size).eval()

    def make(**kw):
        opts = dict(max_tokens=6, guidance=2.0, temperature=0.9)
        opts.update(kw)
        return Generator(model, tok, cfg.objective, 16, SampleConfig(**opts), image=image_repr(cfg))

    return make


def test_tokens_mode_sampling_cache_equals_recompute(tokens_generator):
    prompts = ["a red circle", "x"]
    a, b = (tokens_generator(use_cache=c) for c in (True, False))
    ia, ib = (g.images(prompts, torch.Generator().manual_seed(0)) for g in (a, b))
    assert ia.shape == (2, 3, 16, 16) and a.tokens_per_image == 16
    torch.testing.assert_close(ia, ib)
    assert a.captions(ia, torch.Generator().manual_seed(1)) == b.captions(
        ib, torch.Generator().manual_seed(1)
    )
    ua, ub = (g.units(prompts, "speech", torch.Generator().manual_seed(2)) for g in (a, b))
    assert ua == ub and all(0 <= u < 12 for row in ua for u in row)
    ta, tb = (g.transcribe([[1, 2, 3], [4]], "speech", torch.Generator().manual_seed(3)) for g in (a, b))
    assert ta == tb


def test_tokens_mode_batched_equals_one_by_one(tokens_generator):
    gen = tokens_generator(temperature=0.0)
    prompts = ["a red circle", "two blue squares on the left"]
    batched = gen.images(prompts)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(gen.images([p]), batched[i : i + 1])
    assert gen.units(prompts, "speech") == [gen.units([p], "speech")[0] for p in prompts]


def test_tokens_mode_caption_log_prob_equals_token_by_token(tokens_generator):
    """With VQ codes the caption starts after the codes' end marker, as with patches."""
    gen = tokens_generator()
    codes = [[1, 2, 3] * 5 + [4], list(range(16))]
    texts = ["a red circle", "two blue squares on the left"]
    want = token_by_token_log_prob(gen, [Units("image", c) for c in codes], texts)
    got = gen._log_prob([Units("image", c) for c in codes], texts)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_tokens_mode_best_of_keeps_the_likeliest_whole_image(tokens_generator):
    """VQ codes have no clean image before the last code: best_of compares whole candidates, scored on
    the codes it sampled (decoded pixels, encoded again, need not give the same codes)."""
    k, prompts = 3, ["a red circle", "x"]
    got = tokens_generator(best_of=k).images(prompts, torch.Generator().manual_seed(0))
    one = tokens_generator()
    codes = one._codes(prompts * k, torch.Generator().manual_seed(0))
    scores = one._log_prob([Units("image", c) for c in codes], prompts * k).view(k, 2)
    best = scores.argmax(0)
    assert best.tolist() != [0, 0]
    every = one.images(prompts * k, torch.Generator().manual_seed(0)).view(k, 2, 3, 16, 16)
    torch.testing.assert_close(got, every[best, torch.arange(2)])


@torch.no_grad()
def test_span_decoding_uses_the_modality_head_and_stops_at_the_end(tokens_generator, tok):
    """Steer the speech head to emit 3 units then the end of the span; the interleaved sampler opens
    speech on <bosp>, returns its units, appends <eosp> and goes back to text."""
    gen = tokens_generator(temperature=0.0, max_tokens=8)
    calls = {"text": 0, "speech": 0}
    plan = {"text": [tok.special_ids["<bosp>"], ord("z"), tok.eos], "speech": [5, 6, 7, SPAN_END]}

    def steer(out, modality="text"):
        logits = torch.full_like(gen.model.logits(out.hidden[:, -1], modality).float(), -1e9)
        logits[:, plan[modality][min(calls[modality], len(plan[modality]) - 1)]] = 0
        calls[modality] += 1
        return logits

    gen._logits = steer
    assert gen.units(["hello"], "speech") == [[4, 5, 6]]  # local ids minus the end's slot
    calls.update(text=0, speech=0)
    segments = gen.interleaved("say:")
    assert [type(s).__name__ for s in segments] == ["Text", "Units", "Text"]
    assert segments[1].modality == "speech" and segments[1].ids == [4, 5, 6] and segments[2].text == "z"


@torch.no_grad()
def test_greedy_spans_agree_with_scoring_the_encoded_sequence(tokens_generator, tok):
    """The sampler builds the sequence the encoder builds: a full forward over the prompt and the
    sampled span gives, with the span's head, logits whose argmax is each sampled id."""
    gen = tokens_generator(temperature=0.0, guidance=1.0)
    prompt = "a red circle"
    ctx = Context(gen.model, use_cache=True)
    ctx.run(ctx.prompt([gen._encode([Text(prompt)], then=[tok.boi])], tok.pad))
    codes = gen.span(ctx, None, "image", None, length=gen.tokens_per_image)[0]
    units = gen.units([prompt], "speech", max_units=4)[0]
    for modality, ids, local in [
        ("image", codes, codes),
        ("speech", units, [u + 1 for u in units] + [SPAN_END]),
    ]:
        enc = gen._encode(
            [Text(prompt)], then=[tok.special_ids["<boi>" if modality == "image" else "<bosp>"]]
        )
        start = len(enc) - 1
        enc.tokens += local[: len(ids)]
        enc.modality += [IMAGE if modality == "image" else SPEECH] * len(ids)
        enc.image_slot += [-1] * len(ids)
        enc.learned += [True] * len(ids)
        b = collate([[enc]], len(enc), tok.pad)
        hidden = gen.model(b, b.images, torch.zeros(0)).hidden[0]
        n = len(ids) + (
            modality == "speech" and len(ids) < 4
        )  # an early end is the argmax after the last unit
        assert gen.model.logits(hidden[start : start + n], modality).argmax(-1).tolist() == local[:n]


def test_context_tokens_carry_their_modality(tokens_generator, tok):
    gen = tokens_generator()
    ctx = Context(gen.model, use_cache=True)
    ctx.run(ctx.prompt([gen._encode([Text("a")], then=[tok.boi])], tok.pad))
    chunk = ctx.tokens(torch.tensor([3]), IMAGE)
    assert chunk.modality.tolist() == [[IMAGE]] and chunk.to_batch().modality_index["image"].tolist() == [0]
