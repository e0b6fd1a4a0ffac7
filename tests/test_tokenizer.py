"""data.tokenizer=bpe:N: trained with the run on its own text, carried by every checkpoint and export."""

import pytest
import torch

from motfusion.data.shapes import ShapesDataset, caption_text
from motfusion.errors import ConfigError
from motfusion.recipes import get_recipe
from motfusion.sampling import Generator
from motfusion.tokenizer import (
    TOKENIZER_FILE,
    build_tokenizer,
    length_tokenizer,
    vocab_size,
)
from motfusion.training.checkpoint import export_checkpoint, load_model, step_dir
from motfusion.training.trainer import train

RUN = [
    "train.steps=2",
    "train.batch_size=2",
    "train.seq_len=128",
    "train.device=cpu",
    "train.tensorboard=false",
    "data.tokenizer=bpe:400",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "run"
    train(get_recipe("debug").override(RUN), out)
    return out


def test_trained_with_the_run_on_its_captions(run):
    tok = build_tokenizer("bpe:400", run)
    assert tok.vocab_size == 400
    caption = caption_text(ShapesDataset(split="val").draw(3)[1])
    ids = tok.encode(caption)
    assert tok.decode(ids) == caption
    assert len(ids) == len(caption.split(" ")) + caption.count(",")  # one token per word on this vocabulary
    assert max(ids) < 400


def test_checkpoint_and_export_carry_the_tokenizer(run, tmp_path):
    ckpt = step_dir(run, 2)
    assert (ckpt / TOKENIZER_FILE).read_text() == (run / TOKENIZER_FILE).read_text()
    (run / TOKENIZER_FILE).unlink()  # the checkpoint alone is enough
    model, cfg, tok = load_model(ckpt)
    exported = export_checkpoint(run, tmp_path / "export" / "model.safetensors")
    model2, _, tok2 = load_model(exported)
    prompt = "a small red circle on the left"
    assert tok.encode(prompt) == tok2.encode(prompt)
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    images = [
        Generator(m, t, cfg.objective, cfg.data.image_size).images([prompt], gen)
        for m, t, gen in ((model, tok, g[0]), (model2, tok2, g[1]))
    ]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)


def test_missing_tokenizer_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        build_tokenizer("bpe:400", tmp_path)
    assert vocab_size("bpe:400") == 400 and length_tokenizer("bpe:400").vocab_size == 272


@pytest.mark.parametrize("spec", ["bpe:100", "bpe:x", "bpe:"])
def test_bad_bpe_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        get_recipe("debug").override([f"data.tokenizer={spec}"])
