"""benchmarks/bench.py runs end to end (tiny sizes) and writes its tables; its memory count is exact."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench  # noqa: E402


def test_bench_writes_every_table(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DIMS", (32,))
    monkeypatch.setattr(bench, "BATCH_SIZES", (2, 3))
    monkeypatch.setattr(bench, "SEQ_LENS", (256,))
    monkeypatch.setattr(bench, "SAMPLING_BATCH", 2)
    monkeypatch.setattr(sys, "argv", ["bench.py"])
    bench.main(["--repeats", "1", "--warmup", "0", "--no-compile", "--out", str(tmp_path)])
    train = json.loads((tmp_path / "train_step.json").read_text())["results"]
    assert {(r["batch"], r["modalities"], r["model"]) for r in train} == {
        (b, m, model) for b in ("2x192", "3x192") for m in (2, 3) for model in ("MoT", "dense")
    }
    for b in ("2x192", "3x192"):
        for m in (2, 3):
            mot, dense = (
                next(r for r in train if (r["batch"], r["modalities"], r["model"]) == (b, m, name))
                for name in ("MoT", "dense")
            )
            assert mot["flops_per_token"] == dense["flops_per_token"]  # equal compute per token
            assert mot["memory"]["weights_mb"] > dense["memory"]["weights_mb"]
    sampling = json.loads((tmp_path / "sampling.json").read_text())["results"]
    assert len(sampling) == 8 and all(r["median_ms"] > 0 for r in sampling)
    assert all(r["tokens"] == 2 * 32 for r in sampling if r["task"] == "image_to_text")
    table = (tmp_path / "README.md").read_text()
    assert "| 3 | 32 | MoT |" in table and "| text_to_image | on | 2 |" in table
    assert "MoT / dense train step at 2x192 tokens" in table and "at 3x192 tokens" in table


def test_saved_activation_count_is_exact():
    """A linear layer saves its input for the weight gradient; nothing else here needs saving."""
    model = torch.nn.Linear(8, 4, bias=False)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(16, 8, requires_grad=False)
    mem = bench.memory_mb(model, lambda: model(x).sum().backward(), opt)
    assert mem["saved_activations_mb"] == pytest.approx(16 * 8 * 4 / 2**20)
    assert mem["weights_mb"] == pytest.approx(8 * 4 * 4 / 2**20)


def test_precision_bench_writes_its_rows(tmp_path, monkeypatch):
    """benchmarks/precision.py: one instruction-set row, measured in a child process, in the JSON."""
    import precision

    monkeypatch.setattr(precision, "ISAS", {"AVX-512": "AVX512_CORE"})
    precision.main(["--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "precision.json").read_text())
    (row,) = saved["results"]
    assert row["isa"] == "AVX-512" and row["fp32"] > 0 and row["bf16"] > 0
    assert row["bf16_over_fp32"] == round(row["bf16"] / row["fp32"], 3)
    assert saved["auto_on_this_cpu"] == ("bf16" if saved["amx"] else "fp32")


def test_speech_table_reads_both_judges(tmp_path, capsys):
    import speech_table

    run = tmp_path / "k100"
    run.mkdir()
    own = {"speech_cer": 0.01, "speech_wer": 0.02, "speech_tts_wer_judge": 0.08, "speech_tts_cer_judge": 0.06}
    own |= {"speech_length_ratio": 0.97, "val_loss/speech": 0.72}
    (run / "eval_speech.json").write_text(json.dumps(own))
    (run / "eval_speech_mixed_judge.json").write_text(json.dumps({**own, "speech_tts_wer_judge": 0.09}))
    (run / "config.json").write_text(
        json.dumps({"train": {"steps": 1500}, "model": {"vocab_sizes": {"speech": 100}}})
    )
    speech_table.main([str(run)])
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "| k100 | 1500 | 100 | 0.010 | 0.020 | 0.080 | 0.060 | 0.090 | 0.970 | 0.720 |"


def test_optimizer_bench_writes_both_optimizers(tmp_path):
    """benchmarks/optimizer.py: AdamW and Muon step times of the demo recipe, and their ratio."""
    import optimizer

    optimizer.main(["--repeats", "1", "--threads", "1", "--precision", "fp32", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "optimizer.json").read_text())
    assert saved["step_ms"]["adamw"] > 0 and saved["step_ms"]["muon"] > 0
    assert saved["muon_over_adamw"] == round(saved["step_ms"]["muon"] / saved["step_ms"]["adamw"], 3)


def test_mot_gap_sees_equal_matmul_work_split_by_tower(tmp_path, monkeypatch):
    """benchmarks/mot_gap.py runs tiny; MoT's matmuls do dense's FLOPs, on the towers' token counts."""
    import mot_gap

    monkeypatch.setattr(mot_gap, "DIMS", (32,))
    monkeypatch.setattr(mot_gap, "PARTS_DIMS", (32,))
    monkeypatch.setattr(mot_gap, "PASSES", 2)
    mot_gap.main(["--threads", "1", "--batch-sizes", "2,3", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "mot_gap.json").read_text())
    assert {(r["modalities"], r["rows"]) for r in saved["ratios"]} == {(m, b) for m in (2, 3) for b in (2, 3)}
    (parts,) = saved["parts"]
    towers, (everything,) = parts["tower_tokens"]["MoT"], parts["tower_tokens"]["dense"]
    assert len(towers) == 3 and sum(towers) == everything
    mm = parts["matmuls"]
    flops = {name: sum(g["gflop"] for g in groups.values()) for name, groups in mm.items()}
    assert flops["MoT"] == pytest.approx(flops["dense"], rel=1e-9)  # equal FLOPs, split differently
    for tokens in towers:  # each of a block's 5 linears: forward, input and weight gradients, per layer
        assert mm["MoT"][str(tokens)]["calls"] >= 15 * 2
    assert mm["dense"][str(everything)]["calls"] == 15 * 2
    assert set(parts["parts_ms"]) == {
        "forward + backward",
        "gradient clipping",
        "optimizer update",
        "whole step",
    }
    table = (tmp_path / "mot_gap.md").read_text()
    assert "| **worst** |" in table and "| 32 | MoT | **all** |" in table
