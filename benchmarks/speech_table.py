"""The speech-demo sweep's table (docs/RESULTS.md, "speech-demo"): one row per run directory, from
RUN/eval_speech.json (the run's own judge) and RUN/eval_speech_mixed_judge.json (the judge of the
mixed-English data), both written by benchmarks/speech_sweep.sh eval.

    python benchmarks/speech_table.py runs/spw/base runs/spw/k100 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("run", "steps", "k", "STT CER", "STT WER", "TTS WER (judge)", "TTS CER (judge)")
COLUMNS += ("TTS WER (mixed judge)", "length ratio", "val speech")


def row(run: Path) -> list[str]:
    own = json.loads((run / "eval_speech.json").read_text())
    mixed = json.loads((run / "eval_speech_mixed_judge.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    steps = cfg["train"]["steps"]
    k = cfg["model"]["vocab_sizes"]["speech"]
    cells = (own["speech_cer"], own["speech_wer"], own["speech_tts_wer_judge"], own["speech_tts_cer_judge"])
    cells += (mixed["speech_tts_wer_judge"], own["speech_length_ratio"], own["val_loss/speech"])
    return [run.name, str(steps), str(k), *(f"{v:.3f}" for v in cells)]


def main(runs: list[str]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for run in runs:
        print("| " + " | ".join(row(Path(run))) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
