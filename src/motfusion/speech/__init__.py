"""Speech as a third modality: a text-speech dataset spoken by espeak-ng, log-mel features,
k-means speech units (25 Hz), a Griffin-Lim vocoder, and speech metrics (CER, unit error rate).

    synth.py     make_speech_data, speak, read_speech_data: the dataset on disk
    features.py  read_wav, write_wav, resample, mel_filterbank, LogMel
    units.py     kmeans, SpeechTokenizer (WAV <-> units), train_speech_tokenizer, cached units
    vocoder.py   griffin_lim, MelVocoder (log-mel -> waveform)
    metrics.py   levenshtein, cer, unit_error_rate
"""

from motfusion.speech.features import (
    LogMel,
    MelConfig,
    mel_filterbank,
    read_wav,
    resample,
    write_wav,
)
from motfusion.speech.metrics import cer, levenshtein, unit_error_rate
from motfusion.speech.synth import make_speech_data, read_speech_data, speak
from motfusion.speech.units import (
    SpeechTokenizer,
    SpeechTokenizerConfig,
    kmeans,
    train_speech_tokenizer,
)
from motfusion.speech.vocoder import (
    MelVocoder,
    VocoderConfig,
    griffin_lim,
    spectral_convergence,
)

__all__ = [
    "LogMel", "MelConfig", "MelVocoder", "SpeechTokenizer", "SpeechTokenizerConfig", "VocoderConfig", "cer",
    "griffin_lim", "kmeans", "levenshtein", "make_speech_data", "mel_filterbank", "read_speech_data", "read_wav",
    "resample", "speak", "spectral_convergence", "train_speech_tokenizer", "unit_error_rate", "write_wav",
]
