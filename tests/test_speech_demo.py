"""`motfusion demo --recipe speech-demo`: it makes its speech data, codec, decoder and judge once,
then trains, evaluates speech both ways and writes a report with audio players."""

import json

import soundfile as sf
from test_speech import tiny_overrides

from motfusion import demo
from motfusion.cli import main
from motfusion.data.speech import read_speech_data


def test_speech_demo_makes_its_pieces_once_and_reports_speech(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SPEECH_UTTERANCES", 40)  # seed 0 puts 4 of 40 shapes captions in val
    monkeypatch.setattr(demo, "VOCODER_STEPS", 2)
    monkeypatch.setattr(demo, "JUDGE_STEPS", 2)
    data, run = tmp_path / "speech", tmp_path / "run"
    args = ["demo", "--recipe", "speech-demo", "--out", str(run), "--steps", "2", "--sample-steps", "2"]
    args += ["--n-eval", "2", *tiny_overrides(data)]
    assert main(args) == 0
    assert "making the speech data" in capsys.readouterr().out
    pieces = [
        data / "dataset.json",
        data / "tokenizer/weights.safetensors",
        data / "tokenizer/decoder/weights.safetensors",
        data / "asr-judge/weights.safetensors",
        data / "asr-judge/metrics.json",
    ]
    assert all(p.is_file() for p in pieces)
    assert json.loads((data / "dataset.json").read_text())["sources"] == ["shapes"]
    assert sum(u.split == "val" for u in read_speech_data(data)) == 4

    report = run / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    for key in ("speech_cer", "speech_wer", "speech_tts_wer_judge", "speech_tts_wer_self", "geneval"):
        assert metrics[key] >= 0, key
    assert "final_loss/speech" in metrics
    html = (report / "index.html").read_text()
    assert html.count("<audio") == 4  # two prompts spoken, two held-out recordings transcribed
    assert "Text to speech" in html and "Speech to text" in html
    for name in ("tts_000.wav", "tts_001.wav", "stt_000.wav", "stt_001.wav"):
        assert sf.info(str(report / "audio" / name)).samplerate == 16000

    stamps = [p.stat().st_mtime_ns for p in pieces]
    assert main(args) == 0  # the pieces and the finished run are reused
    out = capsys.readouterr().out
    assert "making the speech data" not in out and "reusing the finished run" in out
    assert [p.stat().st_mtime_ns for p in pieces] == stamps
