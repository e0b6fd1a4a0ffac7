"""The speech judge: CTC decoding, WER, padding invariance, a tiny training, save/load, its CLI."""

import json
import shutil

import jiwer
import pytest
import torch

# speech_data: the fixture of eight espeak-ng utterances with k=8 units
from test_speech import speech_data, tiny_overrides  # noqa: F401

from motfusion.cli import main
from motfusion.codecs.asr import (
    ALPHABET,
    BLANK,
    AsrConfig,
    AsrJudge,
    ctc_greedy,
    load_judge,
    save_judge,
    text_labels,
)
from motfusion.codecs.audio import read_wav
from motfusion.data.speech import read_speech_data
from motfusion.errors import DataError
from motfusion.evaluation.speech import wer
from motfusion.training.asr_judge import spec_augment

TINY = ["channels=32", "hidden=24", "layers=1", "batch_size=4", "lr=3e-3", "warmup=0", "log_every=5"]


# ---- decoding and metrics --------------------------------------------------------------------


def test_ctc_greedy_collapses_repeats_drops_blanks_and_keeps_true_doubles():
    h, e, l, o = text_labels("helo")
    assert ctc_greedy([BLANK, h, h, e, BLANK, l, l, BLANK, l, o, o, BLANK]) == "hello"
    assert ctc_greedy([l, l, l]) == "l"  # repeats without a blank are one letter
    assert ctc_greedy([l, BLANK, l]) == "ll"  # a blank separates a true double
    assert ctc_greedy([]) == "" and ctc_greedy([BLANK] * 5) == ""
    text = "don't stop"
    assert ctc_greedy(text_labels(text)) == text  # no doubles: labels decode to themselves
    assert len(ALPHABET) == len(set(ALPHABET)) == 28  # letters, apostrophe, space; blank is 0
    with pytest.raises(DataError, match="outside the judge's alphabet"):
        text_labels("Hello, world")


@pytest.mark.parametrize(
    "hyps, refs",
    [
        (["the cat sat"], ["the cat sat"]),
        (["the cat sat on"], ["the cat sat"]),
        (["a cat"], ["the cat sat"]),
        (["", "one two three"], ["four five", "one too three four"]),
        (["he said no", "so it goes", "x y z w v"], ["she said no", "so it goes", "a b"]),
    ],
)
def test_wer_equals_jiwers(hyps, refs):
    assert wer(hyps, refs) == pytest.approx(jiwer.wer(refs, hyps))


def test_wer_normalizes_like_the_dataset():
    assert wer(["The cat, SAT!"], ["the cat sat"]) == 0.0
    assert wer(["x x x x"], ["a"]) == 4.0  # insertions can exceed 1


# ---- the network -----------------------------------------------------------------------------


def test_padding_changes_nothing():
    torch.manual_seed(0)
    judge = AsrJudge(AsrConfig(channels=16, hidden=8, stride=3)).eval()
    waves = [torch.randn(n) * 0.1 for n in (4000, 9000, 6100)]
    feats = [judge.features(w) for w in waves]
    x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)  # (3, T, n_mels)
    logits, out_len = judge(x, torch.tensor([len(f) for f in feats]))
    for i, f in enumerate(feats):
        alone, n = judge(f[None], torch.tensor([len(f)]))
        assert int(n) == int(out_len[i]) == (len(f) - 1) // 3 + 1
        torch.testing.assert_close(logits[i, : int(n)], alone[0], atol=1e-5, rtol=1e-5)
    assert judge.transcribe(waves, batch_size=2) == [judge.transcribe([w])[0] for w in waves]


def test_spec_augment_masks_spans_inside_each_row():
    cfg = AsrConfig(time_masks=2, time_mask=5, freq_masks=1, freq_mask=3)
    x, lengths = torch.ones(4, 50, 80), torch.tensor([50, 30, 20, 10])
    out = spec_augment(x, lengths, cfg, torch.Generator().manual_seed(0))
    zeros = out == 0
    assert zeros.any() and not zeros.all()
    time_masked = zeros.all(dim=2)  # (B, T) whole frames masked
    assert time_masked.sum(1).le(2 * 5).all()
    for row, n in enumerate(lengths.tolist()):
        assert not time_masked[row, n + 5 :].any()  # spans start inside the utterance
    assert spec_augment(x, lengths, AsrConfig(time_masks=0, freq_masks=0), torch.Generator()).equal(x)


# ---- training, saving, the CLI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_dir(speech_data):  # noqa: F811
    """A tiny judge trained by the CLI into its default place, DATA/asr-judge."""
    assert main(["train-asr-judge", "--data", str(speech_data), "--steps", "40", *TINY]) == 0
    return speech_data / "asr-judge"


def test_tiny_judge_trains_and_reports_its_error_rates(judge_dir):
    records = [json.loads(line) for line in (judge_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-2:]) / 2
    assert last < 0.8 * first
    metrics = json.loads((judge_dir / "metrics.json").read_text())
    assert metrics["n"] == sum(u.split == "val" for u in read_speech_data(judge_dir.parent))
    assert metrics["wer_judge"] >= 0 and 0 <= metrics["cer_judge"]


def test_judge_saves_and_loads_to_identical_outputs(judge_dir, speech_data, tmp_path):  # noqa: F811
    judge = load_judge(judge_dir)
    waves = [read_wav(u.audio, 16000) for u in read_speech_data(speech_data)[:3]]
    feats = [judge.features(w) for w in waves]
    x, lengths = (
        torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
        torch.tensor([len(f) for f in feats]),
    )
    save_judge(judge, tmp_path / "again")
    again = load_judge(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(judge(x, lengths)[0], again(x, lengths)[0])
    assert judge.transcribe(waves) == again.transcribe(waves)


def test_a_wrong_directory_is_one_clear_line(speech_data, tmp_path, capsys):  # noqa: F811
    args = ["eval-speech-codec", "--data", str(speech_data), "--n", "1"]
    assert main([*args, "--judge", str(speech_data / "tokenizer")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "holds a speech unit codec" in err and "not a CTC speech recogniser" in err
    )
    assert main([*args, "--judge", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "motfusion train-asr-judge" in err


def test_the_speech_suite_asks_the_datasets_judge(judge_dir, speech_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                "speech-demo",
                "--out",
                str(run),
                "--steps",
                "2",
                *tiny_overrides(speech_data),
            ]
        )
        == 0
    )
    args = [
        "eval",
        "--ckpt",
        str(run),
        "--suite",
        "speech",
        "--n",
        "2",
        "--val-batches",
        "1",
        "--max-tokens",
        "4",
    ]
    assert main(args) == 0
    metrics = json.loads((run / "eval_speech.json").read_text())
    assert metrics["speech_tts_wer_judge"] >= 0 and metrics["speech_tts_cer_judge"] >= 0
    # --judge names another recogniser: the same one elsewhere reads the same; a codec is refused
    copy = tmp_path / "judge-copy"
    shutil.copytree(judge_dir, copy)
    again = ["--judge", str(copy), "--out", str(tmp_path / "again.json"), "--val-batches", "0"]
    assert main([*args, *again]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["speech_tts_wer_judge"] == metrics["speech_tts_wer_judge"]
    assert "val_loss" in metrics and "val_loss" not in again  # --val-batches 0: the suite alone
    assert main([*args, "--judge", str(speech_data / "tokenizer")]) == 2


def test_eval_speech_codec_prints_the_judges_table(judge_dir, speech_data, capsys):  # noqa: F811
    assert main(["eval-speech-codec", "--data", str(speech_data), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "| original |" in out and "| units -> centroids + Griffin-Lim |" in out
    results = json.loads((speech_data / "tokenizer" / "eval_codec.json").read_text())
    assert set(results) == {
        "original",
        "25 Hz log-mel + Griffin-Lim",
        "100 Hz log-mel + Griffin-Lim",
        "units -> centroids + Griffin-Lim",
    }  # no decoder trained for this codec: no decoder row
    assert all(r["wer_judge"] >= 0 for r in results.values())
