"""Image editing: the shapes-edit triples, clean source images in the objective, train.init_from,
sampling an edit (cache == no cache), and the CLI's generate --edit and eval --suite edit."""

from collections import Counter

import pytest
import torch
from conftest import assert_one_line, cli

from motfusion.cli import main
from motfusion.data.edits import EDIT_KINDS, edit_document, edit_prompts
from motfusion.data.shapes import render
from motfusion.evaluation.shapes_eval import edit_accuracy
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import GlobalBatch, TransfusionObjective
from motfusion.pipeline import MotFusion
from motfusion.recipes import get_recipe
from motfusion.sampling.generate import Generator, SampleConfig
from motfusion.sequence import IGNORE, Image, Text, collate, encode_document
from motfusion.tokenizer import TOKENIZER_FILE
from motfusion.training.checkpoint import load_model, load_weights, resolve_checkpoint
from motfusion.training.distributed import World
from motfusion.training.trainer import init_weights, new_run

TINY = ["train.steps=3", "train.log_every=1", "train.ema=0.9", "train.tensorboard=false"]


def test_edit_triples_change_one_object_and_their_target_checks():
    edits = edit_prompts(150)
    assert edits == edit_prompts(150)  # a pure function of the seed
    assert set(Counter(e.kind for e in edits)) == set(EDIT_KINDS)
    # The checker reads every rendered target as its target, and no unedited source as one.
    assert edit_accuracy(edits, [render(e.target) for e in edits])["edit_accuracy"] == 1.0
    assert edit_accuracy(edits, [render(e.source) for e in edits])["edit_accuracy"] == 0.0
    for e in edits:
        src, tgt = set(e.source.objects), set(e.target.objects)
        changed = {"add": (0, 1), "remove": (1, 0)}.get(e.kind, (1, 1))
        assert (len(src - tgt), len(tgt - src)) == changed, e
        named = (src - tgt) if e.kind != "add" else (tgt - src)
        obj = next(iter(named))
        assert f"{obj.color} {obj.shape}" in e.instruction, e


def test_an_edit_document_holds_a_clean_source_and_a_scored_target(tok):
    edit = edit_prompts(1)[0]
    enc = encode_document(edit_document(edit), tok, patch_size=8)
    assert enc.image_clean == [True, False]
    batch = collate([[enc]], 256, tok.pad)
    assert batch.image_clean.tolist() == [True, False]


def test_an_edit_teaches_nothing_after_its_source_image(tok, cfg):
    """After a clean image at a document's start, edits teach no next token: neither the
    instruction nor, as an edit without instruction did, BOI, which made the model open images where
    it should caption (caption_accuracy 0.41 -> 0.00)."""
    cfg = cfg.override(["data.dataset=shapes-edit", "data.edit_share=1.0", "data.image_size=32"])
    from motfusion.data.pipeline import DocumentStream, build_dataset

    stream = DocumentStream(build_dataset(cfg, "train"), tok, cfg, "train")
    edits = 0
    for i in range(60):
        batch = collate([[stream(i)]], 256, tok.pad)
        if not batch.image_clean.any():  # a scene no edit applies to: an ordinary document
            continue
        eoi = (batch.tokens[0] == tok.eoi).nonzero()[0, 0]  # the source's EOI
        assert batch.targets[0, eoi] == IGNORE, i
        edits += 1
    assert edits > 50


def test_the_instruction_is_given_not_learned(tok):
    """No next-token loss on an edit's instruction: learned after an image, it made the model write
    instructions where it should caption (caption_accuracy 0.41 -> 0.00 after the first fine-tune).
    The target's BOI, predicted from the instruction's last token, is still learned."""
    edit = edit_prompts(1)[0]
    enc = encode_document(edit_document(edit), tok, patch_size=8)
    batch = collate([[enc]], 256, tok.pad)
    targets = batch.targets[0][batch.targets[0] != IGNORE].tolist()
    assert targets == [tok.boi, tok.boi, tok.eos]  # BOS -> BOI, instruction -> BOI, EOI -> EOS
    caption = encode_document([Image(render(edit.source)), Text(edit.instruction)], tok, patch_size=8)
    learned = collate([[caption]], 256, tok.pad).targets[0]
    assert (learned != IGNORE).sum() == len(tok.encode(edit.instruction)) + 2  # as a caption it is learned


def test_the_clean_source_is_neither_noised_nor_scored(tok):
    """The model sees the source exactly, at t = 0, and the image loss is the target's alone."""
    cfg = get_recipe("debug").override(["data.image_size=32"])
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size)
    edits = edit_prompts(2)
    batch = collate(
        [[encode_document(edit_document(e), tok, cfg.model.patch_size) for e in edits]], 512, tok.pad
    )
    seen = {}

    def spy(module, args, output):
        seen["x_t"], seen["t"], seen["pred"] = args[1], args[2], output.image

    model.register_forward_hook(spy)
    objective = TransfusionObjective(cfg.objective)
    _, parts = objective(model, batch, torch.Generator().manual_seed(0))
    clean = batch.image_clean
    assert clean.sum() == 2 and (~clean).sum() == 2
    assert torch.equal(seen["x_t"][clean], batch.images[clean]) and (seen["t"][clean] == 0).all()
    assert not torch.equal(seen["x_t"][~clean], batch.images[~clean])
    t, noise = objective.draw(batch, GlobalBatch.of(batch), torch.Generator().manual_seed(0))
    target = objective.process.target(batch.images, noise, t)
    expected = (seen["pred"] - target).pow(2).mean(dim=(1, 2, 3))[~clean].mean()
    torch.testing.assert_close(parts["loss/image"], expected)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny shapes run with a trained BPE, and an editing fine-tune of it."""
    root = tmp_path_factory.mktemp("edit")
    common = ["--recipe", "debug", "data.image_size=32", "data.tokenizer=bpe:300", *TINY]
    assert main(["train", *common, "--out", str(root / "base")]) == 0
    edit = [*common, "data.dataset=shapes-edit", f"train.init_from={root / 'base'}"]
    assert main(["train", *edit, "--out", str(root / "edit")]) == 0
    return root


def test_init_from_starts_from_the_weights_alone(base, tok):
    """The moving average of the source run (what it samples with), a fresh step and optimizer, and
    the source's own tokenizer."""
    ckpt = resolve_checkpoint(base / "edit")
    assert (base / "edit" / TOKENIZER_FILE).read_text() == (base / "base" / TOKENIZER_FILE).read_text()
    cfg = get_recipe("debug").override(
        ["data.image_size=32", "data.tokenizer=bpe:300", f"train.init_from={base / 'base'}"]
    )
    run = new_run(cfg, World(), base / "edit")
    line = init_weights(run, cfg.train.init_from)
    assert "moving average" in line and run.step == 0
    assert all(not s for s in run.optimizer.state.values())
    source = load_model(base / "base", ema=True)[0].state_dict()
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, source[key]), key
    assert ckpt.name == "step_00000003"  # the fine-tune counted its own steps from 0
    load_weights(run.model, ckpt)  # same architecture: the fine-tune's weights fit


def test_init_from_another_architecture_is_one_clear_line(base, capsys, tmp_path):
    code, _, err = cli(
        capsys,
        "train",
        "--recipe",
        "debug",
        "data.image_size=32",
        "data.tokenizer=bpe:300",
        "model.dim=32",
        *TINY,
        f"train.init_from={base / 'base'}",
        "--out",
        tmp_path / "bad",
    )
    assert code != 0
    assert_one_line(err, "train.init_from", "model.dim")


def test_instruction_first_keeps_each_target_patch_a_fixed_distance_from_its_source(tok):
    edits = [e for e in edit_prompts(40) if e.kind != "add"]
    short, long = min(edits, key=lambda e: len(e.instruction)), max(edits, key=lambda e: len(e.instruction))

    def gap(edit, layout):
        enc = encode_document(edit_document(edit, layout=layout), tok, patch_size=8)
        slots = torch.tensor(enc.image_slot)
        return int((slots == 1).nonzero()[0]) - int((slots == 0).nonzero()[0])

    assert gap(short, "instruction-first") == gap(long, "instruction-first") == 16 + 2
    assert gap(short, "source-first") < gap(long, "source-first")


@pytest.mark.parametrize("layout", ["source-first", "instruction-first"])
def test_an_edit_samples_the_same_with_and_without_the_cache(base, layout):
    model, cfg, tok = load_model(base / "edit")
    sources = torch.stack([render(e.source) for e in edit_prompts(2)])
    instructions = [e.instruction for e in edit_prompts(2)]
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = [
        Generator(model, tok, cfg.objective, 32, SampleConfig(steps=3, use_cache=c)).edit(
            sources, instructions, noise=noise, layout=layout
        )
        for c in (True, False)
    ]
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-5)


def test_generate_edit_and_the_edit_suite(base, capsys, tmp_path):
    assert "edit" in MotFusion.load(base / "edit").capabilities
    assert "edit" not in MotFusion.load(base / "base").capabilities
    picture = tmp_path / "source.png"
    MotFusion.load(base / "edit").generate_images("a red circle", steps=2)[0].save(picture)
    code, out, _ = cli(
        capsys, "generate", "--ckpt", base / "edit", "--edit", picture, "--prompt", "make the red circle blue",
        "--n", "2", "--steps", "2", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 0 and len(list((tmp_path / "out").glob("*.png"))) == 2, out
    code, out, _ = cli(
        capsys, "eval", "--ckpt", base / "edit", "--suite", "edit", "--n", "5", "--steps", "2",
        "--val-batches", "1", "--out", tmp_path / "edit.json",
    )  # fmt: skip
    assert code == 0 and '"edit_accuracy"' in out and '"edit_untouched"' in out
    code, _, err = cli(capsys, "generate", "--ckpt", base / "edit", "--edit", picture, "--image", picture)
    assert code != 0 and "--prompt" in err
