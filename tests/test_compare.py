"""Step matching (`motfusion compare`) on hand-built metrics whose match point is known in closed form."""

import json

import pytest

from motfusion.cli import main
from motfusion.compare import compare
from motfusion.errors import ConfigError

STEPS = range(10, 101, 10)


def write_run(run, losses: dict[str, list[float]], seconds_per_step: float) -> None:
    """A metrics.jsonl with one record per step of STEPS; cumulative_flops = 1e9 per step."""
    run.mkdir()
    rows = [
        {
            "step": s,
            "cumulative_flops": s * 1e9,
            "elapsed_s": s * seconds_per_step,
            **{k: v[i] for k, v in losses.items()},
        }
        for i, s in enumerate(STEPS)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def runs(tmp_path):
    """Dense: text 2.0 and image 0.5 throughout. MoT: text 4.0 at step 10, then 1.0; image 0.6 throughout.

    With EMA weight w = 0.9 and bias correction, MoT's smoothed text loss after k ones is
    (0.4 w^k + 1 - w^k) / (1 - w^(k+1)), which is <= 2.0 iff 1.2 w^k <= 1: first at k = 2, step 30.
    """
    n = len(STEPS)
    dense, mot = tmp_path / "dense", tmp_path / "mot"
    write_run(dense, {"loss/text": [2.0] * n, "loss/image": [0.5] * n, "loss/speech": [1.0] * n}, 1.0)
    write_run(
        mot,
        {"loss/text": [4.0] + [1.0] * (n - 1), "loss/image": [0.6] * n, "loss/moe_balance": [0.0] * n},
        0.5,
    )
    return dense, mot


def test_match_step_flops_and_time_are_exact_fractions(runs, tmp_path):
    matches = {m.modality: m for m in compare(*runs, tmp_path / "out")}
    assert set(matches) == {"text", "image"}  # speech: dense only; moe_balance: not a modality
    text = matches["text"]
    assert text.dense_final_loss == pytest.approx(2.0)
    assert (text.mot_step, text.mot_flops, text.mot_seconds) == (30, 30e9, 15.0)
    assert (text.step_fraction, text.flops_fraction, text.time_fraction) == (0.3, 0.3, 0.15)


def test_not_reached(runs, tmp_path):
    image = {m.modality: m for m in compare(*runs, tmp_path / "out")}["image"]
    assert not image.reached
    assert image.mot_step is None and image.step_fraction is None and image.time_fraction is None


def test_files_written(runs, tmp_path):
    out = tmp_path / "out"
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert [m["modality"] for m in report["matches"]] == ["text", "image"]
    assert report["matches"][0]["step_fraction"] == 0.3
    table = (out / "compare.md").read_text()
    assert "| text | 2.0000 | 100 | 30 | 30.0% | 30.0% | 15.0% |" in table
    assert "| image | 0.5000 | 100 | not reached | n/a | n/a | n/a |" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_run_exits_2(runs, tmp_path, capsys):
    assert main(["compare", str(runs[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "nope not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), str(runs[1]), "--out", str(tmp_path / "out")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_no_common_modality(tmp_path):
    n = len(STEPS)
    write_run(tmp_path / "a", {"loss/text": [1.0] * n}, 1.0)
    write_run(tmp_path / "b", {"loss/image": [1.0] * n}, 1.0)
    with pytest.raises(ConfigError, match="no per-modality loss"):
        compare(tmp_path / "a", tmp_path / "b", tmp_path / "out")
