"""The demo end to end on the debug recipe: it trains, evaluates, and writes every report file."""

import json

from motfusion.cli import main


def test_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--recipe",
        "debug",
        "--out",
        str(out),
        "--steps",
        "6",
        "--sample-steps",
        "3",
        "--n-eval",
        "4",
        "train.log_every=2",
    ]
    assert main(args) == 0
    report = out / "report"
    for name in ("index.html", "samples.png", "loss.png", "metrics.json"):
        assert (report / name).is_file(), name
    metrics = json.loads((report / "metrics.json").read_text())
    for key in (
        "geneval",
        "geneval_single",
        "caption_accuracy",
        "final_loss/text",
        "final_loss/image",
        "steps",
        "wall_clock_seconds",
    ):
        assert key in metrics, key
    assert metrics["steps"] == 6 and 0 <= metrics["geneval"] <= 1
    forms = [k for k in metrics if k.startswith("geneval_form/")]
    assert forms and all(0 <= metrics[k] <= 1 for k in forms)
    assert "report:" in capsys.readouterr().out
    html = (report / "index.html").read_text()
    assert html.count("<img") >= 4 + 4 + 2  # prompts, captioned images, samples, loss curves
    assert "geneval per caption form" in html
    # A second run reuses the finished training and evaluates again.
    assert main(args) == 0
    assert "reusing the finished run" in capsys.readouterr().out


def test_a_stopped_demo_does_not_evaluate_and_exits_like_train(tmp_path, monkeypatch):
    """Ctrl-C during the demo's training: checkpointed by the trainer, then exit 130 at once, not
    minutes of evaluating a half-trained model (it used to go on to the evaluation)."""
    import motfusion.demo as demo
    from motfusion.training.trainer import TrainResult

    def stopped(cfg, out, resume=False):
        return TrainResult(run_dir=out, step=3, checkpoint=None, elapsed_s=1.0, stopped_by="SIGINT")

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated after a stop")

    monkeypatch.setattr(demo, "train", stopped)
    monkeypatch.setattr(demo, "evaluate_shapes", no_evaluation)
    assert main(["demo", "--recipe", "debug", "--out", str(tmp_path / "demo"), "--steps", "6"]) == 130
    assert not (tmp_path / "demo" / "report").exists()
