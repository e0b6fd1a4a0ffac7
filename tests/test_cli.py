"""CLI conventions: options and overrides in any order on every command, --version, a --help that does not
load torch, --config files under the overrides, --device."""

import json
import subprocess
import sys

import pytest

from motfusion import __version__
from motfusion.cli import COMMANDS, command_parser, main, parse_args


def test_overrides_anywhere_on_the_line(tmp_path, capsys):
    """The issue's own example: overrides before, between and after options."""
    out = tmp_path / "x"
    argv = [
        "train",
        "--recipe",
        "debug",
        "--steps",
        "2",
        "train.log_every=1",
        "--out",
        str(out),
        "model.untie=",
        "train.tensorboard=false",
    ]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["untie"] == [] and saved["train"]["log_every"] == 1 and saved["train"]["steps"] == 2


# Every command that takes positionals, with them split around its options: name -> (line, dest, values).
INTERMIXED = {
    "demo": (["a.b=1", "--out", "o", "c.d=2"], "overrides", ["a.b=1", "c.d=2"]),
    "train": (
        ["a.b=1", "--recipe", "debug", "c.d=2", "--out", "o", "e.f=3"],
        "overrides",
        ["a.b=1", "c.d=2", "e.f=3"],
    ),
    "config": (["a.b=1", "--recipe", "debug", "c.d=2"], "overrides", ["a.b=1", "c.d=2"]),
    "plot": (["r1", "--out", "o.png", "r2"], "runs", ["r1", "r2"]),
    "compare": (["dense", "--out", "o", "mot"], "mot", "mot"),
    "train-speech-tokenizer": (["k=8", "--data", "d", "iters=3"], "overrides", ["k=8", "iters=3"]),
    "train-unit-vocoder": (["steps=2", "--data", "d", "seed=1"], "overrides", ["steps=2", "seed=1"]),
    "train-asr-judge": (["steps=2", "--data", "d", "seed=1"], "overrides", ["steps=2", "seed=1"]),
    **{
        name: (["steps=2", "--out", "o", "seed=1"], "overrides", ["steps=2", "seed=1"])
        for name in ("train-vae", "train-vq", "train-classifier", "train-clip")
    },
}


def test_the_intermixed_table_covers_every_command_with_positionals():
    with_positionals = {n for n in COMMANDS if any(not a.option_strings for a in command_parser(n)._actions)}
    assert with_positionals == set(INTERMIXED)


@pytest.mark.parametrize("name", sorted(INTERMIXED))
def test_positionals_may_follow_options(name):
    line, dest, expected = INTERMIXED[name]
    values = getattr(parse_args([name, *line]), dest)
    assert [str(v) for v in values] == expected if isinstance(expected, list) else str(values) == expected


def test_version():
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0


def test_version_from_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "motfusion", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"motfusion {__version__}"


def test_help_lists_every_command_without_loading_torch():
    code = (
        "import sys\nfrom motfusion.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO TORCH")
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_sits_between_recipe_and_overrides(tmp_path, capsys, suffix):
    values = {"train": {"lr": 0.005, "warmup": 3}, "model": {"dim": 96}}
    path = tmp_path / f"c{suffix}"
    path.write_text(
        json.dumps(values) if suffix == ".json" else "train:\n  lr: 0.005\n  warmup: 3\nmodel:\n  dim: 96\n"
    )
    assert main(["config", "--recipe", "debug", "--config", str(path), "train.warmup=7"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 0.005 and cfg["model"]["dim"] == 96  # the file over the recipe
    assert cfg["train"]["warmup"] == 7  # the command line over the file


@pytest.mark.parametrize(
    "text,message",
    [
        ("train:\n  lr: fast\n", "train.lr='fast' must be a finite number"),
        ("train: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("model:\n  nope: 1\n", "unknown config key 'model.nope'"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--recipe", "debug", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_file_must_exist(tmp_path, capsys):
    assert main(["config", "--recipe", "debug", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device,message", [("tpu", "use cpu, cuda"), ("cuda:7", "GPU"), ("bogus:x", "use cpu, cuda")]
)
def test_bad_device_is_one_line(tmp_path, capsys, device, message):
    run = tmp_path / "run"
    assert (
        main(["train", "--recipe", "debug", "--steps", "1", "--out", str(run), "train.tensorboard=false"])
        == 0
    )
    capsys.readouterr()
    for argv in (
        ["generate", "--ckpt", str(run), "--prompt", "a", "--out", str(tmp_path / "s")],
        ["eval", "--ckpt", str(run), "--n", "1", "--val-batches", "0"],
    ):
        assert main([*argv, "--device", device]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_device_cpu_generates(tmp_path):
    run = tmp_path / "run"
    assert (
        main(["train", "--recipe", "debug", "--steps", "1", "--out", str(run), "train.tensorboard=false"])
        == 0
    )
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run),
                "--prompt",
                "a red circle",
                "--device",
                "cpu",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "s").glob("*.png"))) == 1
