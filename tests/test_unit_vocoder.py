"""The speech codec's trained decoder: units -> finer log-mel frames -> Griffin-Lim."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_speech import speech_data  # noqa: F401 (a fixture: eight espeak-ng utterances, k=8 units)

from motfusion.cli import main
from motfusion.codecs.audio import read_wav
from motfusion.codecs.speech import SpeechTokenizer
from motfusion.codecs.unit_decoder import (
    UnitDecoder,
    UnitDecoderConfig,
    interpolate_units,
    save_unit_decoder,
)
from motfusion.codecs.vocoder import VocoderConfig
from motfusion.data.speech import read_speech_data
from motfusion.errors import ConfigError
from motfusion.evaluation.asr_judge import resyntheses
from motfusion.training.unit_vocoder import decoder_l1, unit_frame_pairs

TINY = ["channels=32", "blocks=2", "crop=24", "batch_size=8", "lr=3e-3", "warmup=0", "log_every=10"]
FAST_GL = VocoderConfig(n_iter=4)


@pytest.fixture(scope="module")
def codec_dir(speech_data, tmp_path_factory):  # noqa: F811
    """A copy of the fixture's k=8 codec with a decoder trained for a few seconds."""
    codec = tmp_path_factory.mktemp("codec") / "tokenizer"
    shutil.copytree(speech_data / "tokenizer", codec)
    args = ["train-unit-vocoder", "--data", str(speech_data), "--codec", str(codec)]
    assert main([*args, "--steps", "60", *TINY]) == 0
    return codec


def waves(data_dir, split=None) -> list[torch.Tensor]:
    return [read_wav(u.audio, 16000) for u in read_speech_data(data_dir) if split in (None, u.split)]


def test_interpolate_units_is_the_vocoders_interpolation():
    x = torch.randn(2, 5, 7)  # (B, D, T)
    fine = interpolate_units(x, 4)  # (B, D, 28)
    ref = F.interpolate(x, size=4 * 6 + 1, mode="linear", align_corners=True)
    torch.testing.assert_close(fine[..., : 4 * 6 + 1], ref)
    assert torch.equal(fine[..., ::4], x)  # frame 4t is unit t's


def test_an_untrained_decoder_decodes_exactly_like_the_centroids(speech_data):  # noqa: F811
    tok = SpeechTokenizer.load(speech_data / "tokenizer")
    cfg = UnitDecoderConfig(k=tok.cfg.k, n_mels=tok.cfg.mel.n_mels, channels=16, blocks=1)
    with_decoder = tok.with_decoder(UnitDecoder(cfg, tok.centroids))
    units = tok.encode(waves(speech_data)[0])  # (T,)
    T = len(units)
    centroid_frames = F.interpolate(
        tok.decode_mel(units)[None], size=4 * (T - 1) + 1, mode="linear", align_corners=True
    )[0]
    torch.testing.assert_close(with_decoder.decoder_mel(units), centroid_frames, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        with_decoder.decode(units, FAST_GL), tok.decode(units, FAST_GL), atol=1e-3, rtol=1e-3
    )


def test_codec_round_trip_gives_audio_of_the_right_length(codec_dir, speech_data):  # noqa: F811
    tok = SpeechTokenizer.load(codec_dir)
    assert tok.decoder is not None  # found in CODEC/decoder
    for wave in waves(speech_data)[:3]:
        units = tok.encode(wave)
        assert units.shape == (1 + len(wave) // 640,)
        audio = tok.decode(units, FAST_GL)
        assert audio.shape == (640 * (len(units) - 1),) and abs(len(audio) - len(wave)) <= 640
        assert tok.decoder_mel(units).shape == (80, 4 * (len(units) - 1) + 1)
        assert 0.1 < audio.abs().max() <= 1.0
    assert tok.decode(torch.tensor([3]), FAST_GL).abs().max() == 0  # too short to vocode: silence


def test_the_trained_decoder_is_closer_to_the_real_frames(codec_dir, speech_data):  # noqa: F811
    tok = SpeechTokenizer.load(codec_dir)
    pairs = unit_frame_pairs(tok, waves(speech_data, "train"), 4)
    untrained = UnitDecoder(tok.decoder.cfg, tok.centroids).eval()
    assert decoder_l1(tok.decoder, pairs) < 0.9 * decoder_l1(untrained, pairs)
    info = json.loads((codec_dir / "decoder" / "config.json").read_text())
    assert info["kind"] == "unit-vocoder" and info["metrics"]["l1_decoder"] > 0


def test_saving_and_refitting_the_codec(codec_dir, tmp_path):
    tok = SpeechTokenizer.load(codec_dir)
    tok.save(tmp_path / "copy")  # the decoder travels with the codec
    again = SpeechTokenizer.load(tmp_path / "copy")
    units = torch.tensor([0, 1, 1, 5, 7, 2])
    assert torch.equal(again.decoder_mel(units), tok.decoder_mel(units))
    moved = tok.centroids + 0.1  # the tokenizer refit: its decoder no longer fits
    save_unit_decoder(tok.decoder, tmp_path / "copy" / "decoder", moved)
    with pytest.raises(ConfigError, match="trained for other speech units"):
        SpeechTokenizer.load(tmp_path / "copy")
    tok.with_decoder(None).save(tmp_path / "copy")  # new centroids saved: the old decoder goes
    assert not (tmp_path / "copy" / "decoder").exists()
    assert SpeechTokenizer.load(tmp_path / "copy").decoder is None


def test_a_wrong_codec_directory_is_one_clear_line(speech_data, capsys):  # noqa: F811
    args = ["train-unit-vocoder", "--data", str(speech_data), "--steps", "1"]
    assert main([*args, "--codec", str(speech_data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not hold a speech unit codec" in err


def test_every_resynthesis_gives_audio_of_the_original_length(codec_dir, speech_data):  # noqa: F811
    tok = SpeechTokenizer.load(codec_dir)
    wave = waves(speech_data)[0]
    rows = resyntheses(tok)
    assert list(rows)[-1] == "units -> decoder + Griffin-Lim"
    for name, resynthesize in rows.items():
        assert abs(len(resynthesize(tok, wave)) - len(wave)) < 640, name
