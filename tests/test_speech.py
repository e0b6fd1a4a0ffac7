"""Speech: features, units, vocoder, metrics, the espeak-ng dataset, and speech inside the model."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from motfusion.cli import main
from motfusion.codecs.audio import (
    LogMel,
    MelConfig,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    read_wav,
    resample,
    stft_magnitude,
)
from motfusion.codecs.speech import (
    Speech,
    SpeechTokenizer,
    SpeechTokenizerConfig,
    load_units,
    resolve_speech_dirs,
)
from motfusion.codecs.vocoder import VocoderConfig, griffin_lim, spectral_convergence
from motfusion.data.espeak import make_speech_data, normalize, speak
from motfusion.data.pipeline import build_dataset
from motfusion.data.speech import read_speech_data
from motfusion.errors import ConfigError
from motfusion.evaluation.speech import cer, levenshtein, read_units, unit_error_rate
from motfusion.recipes import get_recipe
from motfusion.sequence import SPECS, TEXT, Image, Text, collate, encode_document
from motfusion.tokenizer import ByteTokenizer
from motfusion.training.speech_units import fit_tokenizer, kmeans

MEL = MelConfig()


def sine(freq: float, seconds: float = 1.0, rate: int = 16000) -> torch.Tensor:
    return 0.5 * torch.sin(2 * torch.pi * freq * torch.arange(int(seconds * rate)) / rate)


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
    """Eight utterances spoken by espeak-ng, with a k=8 tokenizer and its cached units."""
    root = tmp_path_factory.mktemp("speech")
    assert (
        main(
            [
                "make-speech-data",
                "--out",
                str(root),
                "--n",
                "8",
                "--sources",
                "fortunes",
                "--voices",
                "en-us,en+f3",
                "--val-percent",
                "50",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert main(["train-speech-tokenizer", "--data", str(root), "--k", "8"]) == 0
    return root


# ---- features --------------------------------------------------------------------------------


def test_filterbank_is_triangles_that_sum_to_one():
    fb = mel_filterbank(MEL)  # (n_mels, F)
    assert fb.shape == (MEL.n_mels, MEL.n_freqs)
    assert fb.min() >= 0 and fb.max() <= 1
    assert (fb.sum(1) > 0).all()  # no empty filter
    freqs = torch.linspace(0, MEL.sample_rate / 2, MEL.n_freqs)
    centers = mel_to_hz(
        torch.linspace(float(hz_to_mel(MEL.f_min)), float(hz_to_mel(MEL.f_max)), MEL.n_mels + 2)
    )[1:-1]
    inside = (freqs >= centers[0]) & (freqs <= centers[-1])
    torch.testing.assert_close(fb[:, inside].sum(0), torch.ones(int(inside.sum())), atol=1e-5, rtol=0)
    for m in (0, 40, 79):  # one rise, one fall: nonzero bins are contiguous, peak inside
        nz = fb[m].nonzero().flatten()
        assert (nz.diff() == 1).all()
        assert abs(float(freqs[fb[m].argmax()]) - float(centers[m])) <= MEL.sample_rate / MEL.n_fft


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_log_mel_of_a_sine_peaks_at_its_mel_bin(freq):
    log_mel = LogMel(MEL)(sine(freq))  # (n_mels, T)
    assert log_mel.shape == (MEL.n_mels, 1 + 16000 // MEL.hop)
    centers = mel_to_hz(
        torch.linspace(float(hz_to_mel(MEL.f_min)), float(hz_to_mel(MEL.f_max)), MEL.n_mels + 2)
    )[1:-1]
    expected = int((centers - freq).abs().argmin())
    peak = log_mel[:, 5:-5].mean(1).argmax()
    assert abs(int(peak) - expected) <= 1


def test_resample_matches_the_signal_sampled_at_the_new_rate():
    t_in = np.arange(22050) / 22050
    t_out = np.arange(16000) / 16000
    signal = lambda t: np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 3100 * t + 1)
    y = resample(signal(t_in), 22050, 16000)
    assert y.shape == (16000,)
    np.testing.assert_allclose(y[200:-200], signal(t_out)[200:-200], atol=1e-3)


# ---- k-means and units -----------------------------------------------------------------------


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 4, generator=g) * 10  # (6, 4), far apart
    points = (centers[:, None] + 0.1 * torch.randn(6, 200, 4, generator=g)).flatten(0, 1)  # (1200, 4)
    result = kmeans(points, 6, iters=20, seed=1)
    dist = torch.cdist(centers, result.centroids)  # (6, 6)
    assert dist.min(1).values.max() < 0.05  # every true center has a centroid on it
    assert sorted(dist.argmin(1).tolist()) == list(range(6))  # one each
    assert all(a >= b - 1e-6 for a, b in zip(result.inertia, result.inertia[1:]))  # Lloyd never gets worse


def test_units_round_trip_and_save_load(speech_data, tmp_path):
    data_dir, tok_dir = resolve_speech_dirs(speech_data)
    assert tok_dir == speech_data / "tokenizer" and data_dir == speech_data.resolve()
    tok = SpeechTokenizer.load(tok_dir)
    utterances = read_speech_data(data_dir)
    wave = read_wav(utterances[0].audio, 16000)
    units = tok.encode(wave)
    assert units.shape == (1 + len(wave) // MEL.hop,) and units.dtype == torch.long
    assert 0 <= int(units.min()) and int(units.max()) < tok.vocab_size
    cached, recorded_dir = load_units(tok_dir / "units.safetensors")
    assert recorded_dir == data_dir and len(cached) == len(utterances)
    assert torch.equal(cached[0], units)
    assert tok.decode_mel(units).shape == (MEL.n_mels, len(units))
    assert torch.equal(
        tok.encode_frames(tok.decode_mel(units).T), units
    )  # a centroid's nearest unit is itself
    audio = tok.decode(units, VocoderConfig(n_iter=8))
    assert abs(len(audio) - len(wave)) <= MEL.hop and audio.abs().max() > 0.1
    tok.save(tmp_path)
    assert torch.equal(SpeechTokenizer.load(tmp_path).encode(wave), units)


def test_reconstruction_error_decreases_with_k(speech_data):
    utterances = read_speech_data(speech_data)
    log_mel = LogMel(MEL)
    frames = torch.cat([log_mel(read_wav(u.audio, 16000)).T for u in utterances])  # (N, n_mels)
    errors = []
    for k in (4, 16, 64):
        tok, _ = fit_tokenizer(frames, SpeechTokenizerConfig(k=k, iters=15))
        errors.append(np.mean([tok.reconstruction_mse(read_wav(u.audio, 16000)) for u in utterances]))
    assert errors[0] > errors[1] > errors[2]


def test_dedup_collapses_runs():
    cfg = SpeechTokenizerConfig(k=3, mel=MelConfig(n_mels=2, f_max=8000.0), dedup=True)
    tok = SpeechTokenizer(
        cfg, torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]]), torch.zeros(2), torch.ones(2)
    )
    frames = torch.tensor([[0.1, 0.0], [0.0, 0.2], [5.0, 4.0], [5.1, 5.0], [0.0, 0.0], [-5.0, 5.0]])
    assert tok.encode_frames(frames).tolist() == [0, 1, 0, 2]


# ---- vocoder ---------------------------------------------------------------------------------


def test_griffin_lim_recovers_a_sine_spectrogram():
    target = stft_magnitude(sine(440.0, seconds=0.5), 1024, 160)  # (F, T)
    g = torch.Generator().manual_seed(0)
    start = spectral_convergence(griffin_lim(target, 1024, 160, n_iter=0, generator=g), target, 1024, 160)
    wave = griffin_lim(target, 1024, 160, n_iter=60, generator=torch.Generator().manual_seed(0))
    end = spectral_convergence(wave, target, 1024, 160)
    assert end < 0.1 < start
    spectrum = torch.fft.rfft(wave[1000:-1000]).abs()  # the tone is at 440 Hz
    assert abs(float(spectrum.argmax()) * 16000 / (len(wave) - 2000) - 440.0) < 5.0


# ---- metrics ---------------------------------------------------------------------------------


def test_levenshtein_and_cer_on_hand_examples():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("abc", "abc") == 0
    assert cer(["abd"], ["abc"]) == pytest.approx(1 / 3)
    assert cer(["", "abc"], ["ab", "abc"]) == pytest.approx(2 / 5)  # corpus-level: 2 edits / 5 characters
    assert cer(["A red, circle!"], ["a red circle"]) == 0.0  # normalized
    assert cer(["xxxxxx"], ["ab"]) == pytest.approx(3.0)  # insertions can exceed 1
    assert normalize("Don't  PANIC -- it's 42.") == "don't panic it's"


def test_unit_error_rate_ignores_durations():
    assert unit_error_rate([[1, 1, 2, 2, 2, 3]], [[1, 2, 3, 3]]) == 0.0
    assert unit_error_rate([[1, 4, 3]], [[1, 2, 2, 3]]) == pytest.approx(1 / 3)
    assert unit_error_rate([[]], [[5, 5, 6]]) == 1.0


def test_read_units_skips_what_a_model_left_unsaid():
    """A model that closes its speech span at once said nothing: it reads as "", and the reader is
    never asked to transcribe an empty span (which raised ValueError inside the speech suite)."""

    class Reader:
        def transcribe(self, units, modality, generator):
            assert modality == "speech" and all(units)
            return [f"{len(u)} units" for u in units]

    units = [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long), torch.tensor([3]), torch.tensor([4])]
    assert read_units(Reader(), units, None, batch_size=2) == ["2 units", "", "1 units", "1 units"]


# ---- espeak-ng and the dataset ---------------------------------------------------------------


def test_espeak_speaks_a_sentence_at_16_khz(tmp_path):
    wave = speak("a red circle", voice="en-us", speed=170)
    assert 0.5 < len(wave) / 16000 < 3.0
    assert np.sqrt(np.mean(wave**2)) > 0.02  # not silence
    active = np.abs(wave) > 0.01
    assert active[: len(wave) // 2].any() and active[len(wave) // 2 :].any()


def test_make_speech_data_writes_a_manifest_of_16_khz_wavs(speech_data, tmp_path):
    lines = [json.loads(line) for line in (speech_data / "manifest.jsonl").read_text().splitlines()]
    info = json.loads((speech_data / "dataset.json").read_text())
    assert len(lines) == len(info["items"]) == 8
    for line, item in zip(lines, info["items"]):
        text, audio = line["segments"]
        assert text["text"] == normalize(text["text"]) and item["voice"] in ("en-us", "en+f3")
        meta = sf.info(str(speech_data / audio["audio"]))
        assert meta.samplerate == 16000 and meta.channels == 1
        assert abs(meta.duration - item["seconds"]) < 1e-3
    again = make_speech_data(
        tmp_path,
        n=8,
        sources=("fortunes",),
        voices=("en-us", "en+f3"),
        seed=3,
        val_percent=50,
        log=lambda s: None,
    )
    assert again.read_text() == (speech_data / "manifest.jsonl").read_text()  # same seed, same dataset
    assert (tmp_path / "wav/000005.wav").read_bytes() == (speech_data / "wav/000005.wav").read_bytes()


def test_speech_cli_errors_name_the_fix(tmp_path, capsys):
    assert main(["make-speech-data", "--out", str(tmp_path), "--n", "2", "--sources", "poetry"]) == 2
    assert "unknown speech text source" in capsys.readouterr().err
    assert main(["make-speech-data", "--out", str(tmp_path), "--n", "2", "--voices", "xx-nope"]) == 2
    assert "espeak-ng failed for voice 'xx-nope'" in capsys.readouterr().err
    assert main(["train-speech-tokenizer", "--data", str(tmp_path / "missing")]) == 2
    assert "make-speech-data" in capsys.readouterr().err


# ---- speech in documents, in the model ------------------------------------------------------


def tiny_overrides(data_dir, *more) -> list[str]:
    """speech-demo shrunk to seconds: the fixture's k=8 units, 16 px shapes images."""
    return [
        "model.dim=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.vocab_sizes=speech:8",
        f"data.dataset=speech:{data_dir}",
        "data.image_size=16",
        "train.batch_size=2",
        "train.seq_len=256",
        "train.warmup=1",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.tensorboard=false",
        *more,
    ]


def tiny_speech_config(data_dir, *more):
    return get_recipe("speech-demo").override(tiny_overrides(data_dir, *more))


def test_speech_dataset_documents(speech_data):
    units, _ = load_units(speech_data / "tokenizer" / "units.safetensors")
    utterances = read_speech_data(speech_data)
    train = [(u.text, units[i].tolist()) for i, u in enumerate(utterances) if u.split == "train"]
    ds = build_dataset(tiny_speech_config(speech_data, "data.speech_shapes_share=0"), "train")
    assert len(ds) == len(train)
    docs = [ds.document(i % len(ds), np.random.default_rng(i)) for i in range(40)]
    for doc in docs:  # text->speech or speech->text, always a true pair
        text, speech = doc if isinstance(doc[0], Text) else doc[::-1]
        assert isinstance(speech, Speech) and (text.text, list(speech.ids)) in [(t, u) for t, u in train]
    assert 5 < sum(isinstance(d[0], Text) for d in docs) < 35  # both orders, about half each
    mixed = build_dataset(tiny_speech_config(speech_data, "data.speech_shapes_share=0.5"), "train")
    shapes_docs = sum(
        any(isinstance(seg, Image) for seg in mixed.document(0, np.random.default_rng(i))) for i in range(40)
    )
    assert 5 < shapes_docs < 35  # shapes text-image documents mixed in


def test_speech_span_encodes_between_markers_and_predicts_its_end():
    tok = ByteTokenizer()
    enc = encode_document([Text("hi"), Speech([4, 0, 7])], tok, patch_size=4)
    spec = SPECS["speech"]
    assert enc.tokens == [
        tok.bos,
        *b"hi",
        tok.special_ids["<bosp>"],
        5,
        1,
        8,
        tok.special_ids["<eosp>"],
        tok.eos,
    ]
    assert enc.modality == [TEXT] * 4 + [spec.index] * 3 + [TEXT] * 2
    batch = collate([[enc]], seq_len=16, pad_id=tok.pad)
    speech_targets = batch.targets.flatten()[batch.loss_index["speech"]].tolist()
    assert speech_targets == [5, 1, 8, 0]  # each unit, then SPAN_END predicted by the speech head


def test_speech_vocab_must_match_the_tokenizer(speech_data):
    with pytest.raises(ConfigError, match="model.vocab_sizes=speech:8"):
        build_dataset(tiny_speech_config(speech_data, "model.vocab_sizes=speech:500"), "train")


def test_speech_demo_trains_speaks_transcribes_and_evaluates(speech_data, tmp_path):
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
                "8",
                *tiny_overrides(speech_data),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss/speech"] == pytest.approx(
        math.log(9), abs=0.3
    )  # 8 units + SPAN_END, near uniform
    assert records[-1]["loss/speech"] < records[0]["loss/speech"]
    assert all(math.isfinite(r["loss/text"]) and math.isfinite(r["loss/image"]) for r in records)

    wav = tmp_path / "say.wav"
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run),
                "--speak",
                "a red circle",
                "--out",
                str(wav),
                "--temperature",
                "1",
            ]
        )
        == 0
    )
    assert sf.info(str(wav)).samplerate == 16000
    assert main(["generate", "--ckpt", str(run), "--transcribe", str(wav), "--max-tokens", "4"]) == 0
    assert (
        main(
            [
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
                "--temperature",
                "1",
            ]
        )
        == 0
    )
    metrics = json.loads((run / "eval_speech.json").read_text())
    assert metrics["speech_cer"] >= 0 and 0 <= metrics["speech_unit_accuracy"] <= 1
    assert math.isfinite(metrics["val_loss/speech"])
