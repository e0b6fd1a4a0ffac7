"""MotFusion, the Python front door: the README's three lines, the same outputs as the CLI for the same
seed, exact save_pretrained -> from_pretrained round trips (codecs travel with the model), and every
modality: pixels, VAE latents, VQ codes, speech."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from test_speech import tiny_overrides
from test_vae import tiny
from test_vq import make_vq_dir

from motfusion import MotFusion
from motfusion.cli import main, parse_args
from motfusion.cli.common import sample_config
from motfusion.codecs.vae import build_vae, save_vae
from motfusion.errors import ConfigError
from motfusion.recipes import get_recipe
from motfusion.sampling import SampleConfig
from motfusion.sampling.load import load_generator
from motfusion.training.checkpoint import export_checkpoint
from motfusion.training.trainer import train

QUICK = ["train.steps=2", "train.log_every=1", "train.tensorboard=false", "train.checkpoint_every=0"]
SAMPLE = ["--steps", "3", "--max-tokens", "6"]


def quick_run(path, *overrides: str, recipe: str = "debug"):
    train(get_recipe(recipe).override([*QUICK, *overrides]), path)
    return path


def load(path, **kw) -> MotFusion:
    return MotFusion.from_pretrained(path, device="cpu", sample=SampleConfig(steps=3, max_tokens=6), **kw)


def pixels(pic: PILImage.Image) -> np.ndarray:
    return np.asarray(pic.convert("RGB"))


def same_images(a: list[PILImage.Image], b: list[PILImage.Image]) -> bool:
    return len(a) == len(b) and all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return quick_run(tmp_path_factory.mktemp("pipeline") / "run")


def test_readme_three_lines(run):
    m = MotFusion.from_pretrained(run)
    images = m.generate_images(["a red circle"], n=2)
    assert len(images) == 2 and all(isinstance(im, PILImage.Image) and im.size == (16, 16) for im in images)


def test_images_and_captions_equal_the_cli_for_the_same_seed(run, tmp_path, capsys):
    m = load(run)
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run),
                "--prompt",
                "a red circle",
                "--prompt",
                "two blue squares",
                "--n",
                "2",
                "--seed",
                "5",
                "--out",
                str(tmp_path),
                *SAMPLE,
            ]
        )
        == 0
    )
    files = sorted(tmp_path.glob("*.png"))
    cli = [pixels(PILImage.open(f))[::4, ::4] for f in files]  # the CLI's PNGs are 4x nearest upscales
    ours = m.generate_images(["a red circle", "two blue squares"], n=2, seed=5)
    assert len(files) == 4 and all(np.array_equal(a, pixels(b)) for a, b in zip(cli, ours))
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run), "--image", str(files[0]), "--seed", "2", *SAMPLE]) == 0
    cli_caption = capsys.readouterr().out.strip().split("\t", 1)[1]
    assert m.caption([files[0]], seed=2) == [cli_caption]
    assert m.caption(PILImage.open(files[0]), seed=2) == [cli_caption]  # a PIL picture reads like its file


def test_best_of_equals_the_cli_and_keeps_one_of_its_draws(run, tmp_path):
    """--best-of N and generate_images(best_of=N) keep the same picture; it is one of the N drawn."""
    args = ["--ckpt", str(run), "--prompt", "a red circle", "--seed", "5", "--out", str(tmp_path), *SAMPLE]
    assert main(["generate", *args, "--best-of", "3"]) == 0
    cli = pixels(PILImage.open(next(tmp_path.glob("*.png"))))[::4, ::4]
    m = load(run)
    ours = m.generate_images("a red circle", seed=5, best_of=3)
    assert np.array_equal(cli, pixels(ours[0]))
    drawn = m.generate_images(["a red circle"] * 3, seed=5)  # the same stream, one batch of 3
    assert any(same_images(ours, [d]) for d in drawn)


def test_save_pretrained_round_trip_is_exact(run, tmp_path, monkeypatch):
    m = load(run)
    m.save_pretrained(tmp_path / "saved")
    monkeypatch.chdir(tmp_path)  # nothing resolves against the directory it was saved from
    back = load(tmp_path / "saved")
    for (k, a), (_, b) in zip(
        m.generator.model.state_dict().items(), back.generator.model.state_dict().items()
    ):
        assert torch.equal(a, b), k
    assert back.cfg.to_dict() == m.cfg.to_dict()
    assert same_images(
        back.generate_images("a red circle", n=2, seed=1), m.generate_images("a red circle", n=2, seed=1)
    )
    assert back.interleaved("a", seed=0) == m.interleaved("a", seed=0)


def test_exported_file_loads(run, tmp_path):
    out = export_checkpoint(run, tmp_path / "model.safetensors")
    assert same_images(
        load(out).generate_images("a green star", seed=3), load(run).generate_images("a green star", seed=3)
    )


def test_trained_tokenizer_travels(tmp_path):
    src = quick_run(tmp_path / "bpe", "data.tokenizer=bpe:300")
    load(src).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    assert load(tmp_path / "saved").caption(torch.zeros(1, 3, 16, 16), seed=0) == load(src).caption(
        torch.zeros(1, 3, 16, 16), seed=0
    )


def test_vq_and_latent_models_carry_their_codecs(tmp_path):
    vq = make_vq_dir(tmp_path / "vq")
    cfg = tiny(image_size=16)
    torch.manual_seed(0)
    save_vae(tmp_path / "vae", build_vae(cfg), cfg)
    runs = {
        "tokens": quick_run(
            tmp_path / "tokens", "data.image_repr=tokens", f"model.vq={vq}", "model.vocab_sizes=image:32"
        ),
        "latents": quick_run(
            tmp_path / "latents",
            "data.image_repr=latents",
            f"model.vae={tmp_path / 'vae'}",
            "model.patch_size=2",
        ),
    }
    before = {name: load(r).generate_images("a red circle", seed=4) for name, r in runs.items()}
    for name, r in runs.items():
        load(r).save_pretrained(tmp_path / f"saved-{name}")
    shutil.rmtree(vq)
    shutil.rmtree(tmp_path / "vae")  # the saved directories must not need the originals
    for name in runs:
        after = load(tmp_path / f"saved-{name}").generate_images("a red circle", seed=4)
        assert same_images(after, before[name]) and after[0].size == (16, 16), name


def test_speech_speaks_and_transcribes_after_a_round_trip(tmp_path):
    data = tmp_path / "speech"
    assert (
        main(
            [
                "make-speech-data",
                "--out",
                str(data),
                "--n",
                "6",
                "--sources",
                "fortunes",
                "--voices",
                "en-us",
                "--val-percent",
                "50",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert main(["train-speech-tokenizer", "--data", str(data), "--k", "8"]) == 0
    run = quick_run(tmp_path / "run", *tiny_overrides(data), recipe="speech-demo")
    m = load(run)
    wave, rate = m.speak("a red circle", seed=0)
    assert rate == 16000 and wave.ndim == 1 and wave.numel() > 0
    heard = m.transcribe([wave], seed=0)
    assert len(heard) == 1 and isinstance(heard[0], str)
    m.save_pretrained(tmp_path / "saved")
    shutil.rmtree(data)  # the saved directory carries the speech codec
    back = load(tmp_path / "saved")
    assert torch.equal(back.speak("a red circle", seed=0)[0], wave)
    assert back.transcribe(wave, seed=0) == heard


def test_a_mode_the_checkpoint_cannot_do_is_a_clear_error(run):
    with pytest.raises(ConfigError, match="no speech.*speech-demo"):
        load(run).speak("hello")
    with pytest.raises(ValueError, match="at least one image"):
        load(run).generate_images("a red circle", n=0)


def test_a_run_is_sampled_with_its_recipes_guidance_unless_told_otherwise(tmp_path):
    """objective.guidance, guidance_early and best_of travel in the run's config: the Python API,
    `generate` and `eval` sample with them when none is given, and with the given ones when they are."""
    run = quick_run(
        tmp_path / "g6", "objective.guidance=6", "objective.guidance_early=2.5", "objective.best_of=3"
    )
    assert MotFusion.from_pretrained(run).generator.cfg.guidance == 6.0
    assert load(run).generator.cfg.guidance == 6.0  # a SampleConfig that leaves guidance unset
    assert (load(run).generator.cfg.guidance_early, load(run).generator.cfg.best_of) == (2.5, 3)
    told = MotFusion.from_pretrained(run, sample=SampleConfig(guidance=2.0, guidance_early=4.0, best_of=1))
    assert (told.generator.cfg.guidance, told.generator.cfg.guidance_early, told.generator.cfg.best_of) == (
        2,
        4,
        1,
    )
    given = ["--guidance", "1.5", "--guidance-early", "1", "--best-of", "2"]
    for command in (["generate", "--prompt", "a"], ["eval"]):
        for flags, want in (([], (6.0, 2.5, 3)), (given, (1.5, 1.0, 2))):
            args = parse_args([*command, "--ckpt", str(run), *flags])
            gen, _ = load_generator(run, "cpu", sample_config(args))
            assert (gen.cfg.guidance, gen.cfg.guidance_early, gen.cfg.best_of) == want
