"""Agreement with the libraries people trust: our own implementations against diffusers, librosa,
jiwer and torchmetrics, on the same inputs and with the settings mapped one to one.

Every tolerance names where the remaining difference comes from. The reference libraries are pinned
in requirements-dev.txt, which `make test` installs, so these tests run rather than skip.
"""

import itertools
import random

import diffusers
import jiwer
import jiwer.transforms
import librosa
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from motfusion.codecs.audio import LogMel, MelConfig, mel_filterbank, stft_magnitude
from motfusion.codecs.diffusers_vae import load_diffusers_vae
from motfusion.codecs.vae import load_vae
from motfusion.data.espeak import normalize
from motfusion.evaluation.classifier import ClassifierConfig, FashionClassifier
from motfusion.evaluation.image_metrics import classifier_features, frechet_distance_of
from motfusion.evaluation.speech import cer, levenshtein, unit_error_rate

# ---- diffusers: AutoencoderKL -----------------------------------------------------------------

VAE_CONFIGS = {
    "attention": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
    "deep_no_attention": dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=3,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3,
        shift_factor=0.1,
    ),
}
# Measured on CPU float32: with the mid-block attention, 5e-7 on posterior moments and 2.4e-6 on decoder
# outputs of magnitude ~1 (diffusers calls SDPA on a (B, heads, HW, C) layout, which may take another
# kernel and summation order); without attention the same kernels run in the same order and the
# outputs are bit-identical. README.md quotes this bound.
VAE_ATOL = 5e-6


@pytest.fixture(scope="module", params=list(VAE_CONFIGS))
def diffusers_vae(request, tmp_path_factory):
    """A seeded, randomly initialised diffusers AutoencoderKL and the directory it saved itself to."""
    kw = VAE_CONFIGS[request.param]
    n = len(kw["block_out_channels"])
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kw
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # GroupNorms start at weight 1, bias 0: move them, so swapped norms would show
        for m in ref.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=g))
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref.eval(), path


@torch.no_grad()
def test_diffusers_vae_encodes_and_decodes_like_diffusers(diffusers_vae):
    ref, path = diffusers_vae
    ours = load_diffusers_vae(path)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 24, 40, generator=g) * 2 - 1  # (B, 3, H, W), not square: the one-sided pad shows
    expected, posterior = ref.encode(x).latent_dist, ours.encode(x)
    torch.testing.assert_close(posterior.mean, expected.mean, atol=VAE_ATOL, rtol=0)
    torch.testing.assert_close(posterior.logvar, expected.logvar, atol=VAE_ATOL, rtol=0)
    z = torch.randn(expected.mean.shape, generator=g)  # (B, C, h, w)
    torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=VAE_ATOL, rtol=0)


@torch.no_grad()
def test_load_vae_scales_latents_as_diffusers_pipelines_do(diffusers_vae):
    """Pipelines encode to (mean - shift_factor) * scaling_factor and decode z / scaling_factor + shift_factor."""
    ref, path = diffusers_vae
    codec = load_vae(path)
    scale, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
    assert (codec.scale, codec.shift) == (scale, shift)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    z = (ref.encode(x).latent_dist.mean - shift) * scale  # (B, C, h, w)
    torch.testing.assert_close(codec.encode(x), z, atol=VAE_ATOL * scale, rtol=0)
    torch.testing.assert_close(
        codec.decode(z), ref.decode(z / scale + shift).sample.clamp(-1, 1), atol=VAE_ATOL, rtol=0
    )


# ---- librosa: mel filterbank, STFT, log-mel ---------------------------------------------------

MEL_CONFIGS = [
    MelConfig(),  # the speech units' features
    MelConfig(sample_rate=22050, n_fft=512, hop=128, n_mels=40, f_min=60.0, f_max=7600.0),
]


def librosa_mel(y: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """Our LogMel's settings in librosa's words: HTK mel scale, triangles with peak 1 (norm=None),
    periodic Hann window of n_fft, centered frames reflect-padded (librosa's default pads zeros),
    magnitude rather than power."""
    return librosa.feature.melspectrogram(
        y=y,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop,
        window="hann",
        center=True,
        pad_mode="reflect",
        power=1.0,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
        htk=True,
        norm=None,
    )


def sound(name: str, rate: int) -> np.ndarray:
    """Two seconds and a bit of a linear chirp sweeping 50 Hz to 0.95 Nyquist, of white noise, or of both.

    The length is not a multiple of any hop here: when it is, librosa 0.11 reflect-pads its last
    frame from a tail n_fft // 2 samples long, one sample short of what reflecting the whole signal
    needs, so its last frame differs from torch.stft's by ~window[-1] * |y| (1e-5 |y| at n_fft=1024).
    """
    t = np.arange(2 * rate + 123) / rate
    f0, f1 = 50.0, 0.95 * rate / 2
    chirp = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * t[-1]) * t**2))
    noise = 0.1 * np.random.default_rng(0).standard_normal(len(t))
    return {"chirp": chirp, "noise": noise, "chirp+noise": chirp + noise}[name]


@pytest.mark.parametrize("cfg", MEL_CONFIGS, ids=["speech", "22k"])
def test_mel_filterbank_equals_librosa_htk(cfg):
    """Both evaluate the same triangles in float64 and round to float32: equal to an ulp."""
    ref = librosa.filters.mel(
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
        htk=True,
        norm=None,
    )
    torch.testing.assert_close(mel_filterbank(cfg), torch.from_numpy(ref), atol=1.2e-7, rtol=0)


@pytest.mark.parametrize("cfg", MEL_CONFIGS, ids=["speech", "22k"])
def test_stft_magnitude_equals_librosa_in_float64(cfg):
    """Framing, padding and window are the same: in float64 only FFT rounding (measured 3e-16 x max) differs."""
    y = sound("chirp+noise", cfg.sample_rate)
    ref = np.abs(
        librosa.stft(
            y,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop,
            window="hann",
            center=True,
            pad_mode="reflect",
            dtype=np.complex128,
        )
    )  # (F, T)
    ours = stft_magnitude(torch.from_numpy(y), cfg.n_fft, cfg.hop)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, torch.from_numpy(ref), atol=1e-12 * ref.max(), rtol=0)


@pytest.mark.parametrize("signal", ["chirp", "noise", "chirp+noise"])
@pytest.mark.parametrize("cfg", MEL_CONFIGS, ids=["speech", "22k"])
def test_mel_spectrogram_matches_librosa(cfg, signal):
    """Our float32 LogMel against librosa on float32 audio.

    Linear mel: librosa multiplies by a float64 window, so its FFT runs in float64; ours runs in
    float32, whose rounding in every bin is a fraction of the frame's energy, not the bin's (measured
    2e-7 x max). Log-mel on chirp + noise, where no bin falls below 0.07, so that rounding stays a
    small relative error (measured 9e-6); a pure chirp has bins near the 1e-5 floor where it does not.
    """
    y = sound(signal, cfg.sample_rate).astype(np.float32)
    log_mel = LogMel(cfg)
    ref = librosa_mel(y, cfg)  # (n_mels, T)
    ours = log_mel.mel(torch.from_numpy(y))
    assert ours.shape == ref.shape == (cfg.n_mels, log_mel.num_frames(len(y)))
    torch.testing.assert_close(ours, torch.from_numpy(ref), atol=1e-6 * float(ref.max()), rtol=0)
    if signal == "chirp+noise":
        ref_log = np.log(np.maximum(ref, cfg.log_floor))
        torch.testing.assert_close(log_mel(torch.from_numpy(y)), torch.from_numpy(ref_log), atol=1e-4, rtol=0)


# ---- jiwer: edit distance, CER, unit error rate -----------------------------------------------

HAND_PAIRS = [  # (hypothesis, reference)
    ("kitten", "sitting"),
    ("", "abc"),
    ("abc", "abc"),
    ("the cat sat", "the cat sat on the mat"),
    ("flaw", "lawn"),
    ("  padded ", "padded"),
    ("aaaa", "a"),
    ("ab", "ba"),
]
RAW = jiwer.transforms.ReduceToListOfListOfChars()  # every character counts, spaces at the ends too


def random_pairs(n: int, seed: int, alphabet: str = "ab c'Xé,") -> list[tuple[str, str]]:
    rng = random.Random(seed)
    text = lambda lo: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, 30)))
    return [(text(0), text(1)) for _ in range(n)]


def test_levenshtein_equals_jiwer_edit_count():
    for hyp, ref in HAND_PAIRS + random_pairs(300, seed=0):
        out = jiwer.process_characters(ref, hyp, reference_transform=RAW, hypothesis_transform=RAW)
        assert levenshtein(hyp, ref) == out.substitutions + out.deletions + out.insertions, (hyp, ref)


def test_cer_equals_jiwer_cer():
    """Corpus-level in both: total edits over total reference characters."""
    hyps, refs = zip(*(HAND_PAIRS + random_pairs(300, seed=1)))
    # jiwer's default transform strips each string, ours does not: compare with every character kept.
    expected = jiwer.cer(list(refs), list(hyps), reference_transform=RAW, hypothesis_transform=RAW)
    assert cer(hyps, refs, normalized=False) == pytest.approx(expected, rel=1e-12)


def test_normalized_cer_equals_jiwer_cer_of_normalized_text():
    hyps = ["Hello, World!", "it's  a TEST.", "no--match here", "Don't stop", "'quoted' words"]
    refs = ["hello world", "its a test", "no match", "do not stop", "quoted words!"]
    expected = jiwer.cer([normalize(r) for r in refs], [normalize(h) for h in hyps])  # default transform
    assert cer(hyps, refs) == pytest.approx(expected, rel=1e-12)
    assert cer(hyps, refs) != cer(hyps, refs, normalized=False)  # the normalization did something


def test_unit_error_rate_equals_jiwer_wer_of_collapsed_units():
    """Runs of a unit collapse to one, then units are words: UER is jiwer's WER of those words."""
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 6, rng.integers(1, 40)).tolist() for _ in range(100)]  # few units: long runs
    hyps = [rng.integers(0, 6, rng.integers(0, 40)).tolist() for _ in range(100)]
    words = lambda units: " ".join(str(u) for u, _ in itertools.groupby(units))
    expected = jiwer.wer([words(r) for r in refs], [words(h) for h in hyps])
    assert unit_error_rate(hyps, refs) == pytest.approx(expected, rel=1e-12)


# ---- torchmetrics: Fréchet distance -----------------------------------------------------------


class ClassifierFeatures(nn.Module):
    """FashionClassifier's FID features as torchmetrics wants a custom extractor: images -> (N, F).

    Cast to float64, which torchmetrics then reports its result in (it returns the features' dtype)."""

    def __init__(self, classifier: FashionClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.head.in_features  # spares torchmetrics a probing forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).double()  # (N, F)


def blobs(n: int, g: torch.Generator, contrast: float, brightness: float) -> torch.Tensor:
    """(n, 3, 28, 28) in [-1, 1]: smooth random blobs with a random contrast and offset per image."""
    x = F.interpolate(torch.randn(n, 3, 7, 7, generator=g), size=28, mode="bilinear")
    a = contrast * torch.rand(n, 1, 1, 1, generator=g)
    b = brightness * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    return (a * x + b).clamp(-1, 1)


@pytest.mark.parametrize(
    "fake_contrast, fake_brightness", [(0.4, 1.6), (1.0, 1.0)], ids=["different", "same"]
)
def test_frechet_distance_matches_torchmetrics_fid(fake_contrast, fake_brightness):
    """Same float32 features into both; both compute in float64. torchmetrics takes the covariance from
    sums of outer products and tr sqrt(sigma1 sigma2) from the complex eigenvalues of the
    non-symmetric product; we use np.cov and a symmetric eigendecomposition. An untrained ReLU layer
    leaves dead features (singular covariances), whose ~0 eigenvalues each add rounding through the
    square root: measured 4e-9 relative when the distributions differ, 4e-8 when they match (the
    distance is then a small difference of large traces)."""
    torch.manual_seed(0)
    classifier = FashionClassifier(ClassifierConfig(width=8, feature_dim=32)).eval()  # untrained: seeded init
    g = torch.Generator().manual_seed(1)
    real, fake = blobs(300, g, 1.0, 1.0), blobs(250, g, fake_contrast, fake_brightness)
    metric = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), normalize=True)  # float inputs
    with torch.no_grad():
        metric.update(real, real=True)
        metric.update(fake, real=False)
    expected = metric.compute()
    assert expected.dtype == torch.float64
    ours = frechet_distance_of(classifier_features(classifier, fake), classifier_features(classifier, real))
    assert ours > 0
    assert ours == pytest.approx(float(expected), rel=1e-5)
