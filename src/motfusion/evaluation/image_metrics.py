"""Image metrics and the fashion and emoji evaluation suites.

- `frechet_distance`: the FID formula on any features. `fid_fashion_classifier` applies it to the
  penultimate features of the Fashion-MNIST classifier trained here (motfusion.evaluation.classifier),
  not to Inception's: the name says so, and its values compare only with each other.
- `class_accuracy`: the classifier's verdict on images generated from class captions.
- `clip_score_motfusion`: 100 x cosine similarity under the CLIP trained here (evaluation.clip).
- `validation_losses`: the training objective on a fixed set of val batches, per modality.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from motfusion.config import Config
from motfusion.data.fashion import caption_names_class
from motfusion.data.pipeline import build_dataset
from motfusion.evaluation.classifier import FashionClassifier, accuracy, batched
from motfusion.evaluation.clip import ClipModel, clip_score
from motfusion.sampling import Generator
from motfusion.sampling.batches import captions_in_batches, images_in_batches


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) -> mean (F,) and unbiased covariance (F, F), in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, F), got {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix, by eigen-decomposition.

    Rounding can leave tiny negative eigenvalues; they are clipped to zero."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((sigma1 sigma2)^(1/2)) = tr((s sigma2 s)^(1/2)) with s = sigma1^(1/2): the product s sigma2 s
    is similar to sigma1 sigma2 but symmetric PSD, so its square root comes from a symmetric
    eigen-decomposition, with no complex parts to discard (scipy's sqrtm on the raw product can
    give them for nearly singular covariances, e.g. fewer samples than features).
    """
    s = _psd_sqrt(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s @ sigma2 @ s), 0, None)).sum()
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)
    return max(d, 0.0)


def frechet_distance_of(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, F) and (M, F)."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def classifier_features(classifier: FashionClassifier, images: torch.Tensor) -> torch.Tensor:
    return batched(classifier.features, images.cpu().float())


def class_accuracy(classifier: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images that the classifier puts in the class they were generated for."""
    return accuracy(classifier, images.cpu().float(), labels)


def suite_config(cfg: Config, suite: str) -> Config:
    """The checkpoint's config, reading the suite's dataset: its own path if it was trained on it."""
    same = cfg.data.dataset.partition(":")[0] == suite
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, dataset=cfg.data.dataset if same else suite)
    )


def evaluate_fashion(
    gen: Generator,
    cfg: Config,
    classifier: FashionClassifier,
    clip: ClipModel,
    *,
    n: int = 200,
    n_reference: int = 2000,
    seed: int = 0,
    batch_size: int = 50,
) -> dict[str, float]:
    """Text to image from the captions of the first `n` val images, scored against the val images:
    fid_fashion_classifier (n generated vs `n_reference` real), class_accuracy, clip_score_motfusion;
    image to text on the same val images: caption_accuracy (the caption names the right class).
    `.../real` entries score real images the same way: the floor (FID of n real images) or ceiling."""
    scfg = suite_config(cfg, "fashion")
    val, train = build_dataset(scfg, "val"), build_dataset(scfg, "train")
    n, n_reference = min(n, len(val)), min(n_reference, len(val))
    samples = [val.sample(i) for i in range(n)]
    prompts, labels = [s.caption for s in samples], torch.tensor([s.label for s in samples])
    real = torch.stack([s.image for s in samples])  # (n, 3, H, W)
    reference = torch.stack([val.sample(i).image for i in range(n_reference)])
    other_real = torch.stack(
        [train.sample(i).image for i in range(n)]
    )  # real images that are not the reference

    g = torch.Generator(device=gen.device).manual_seed(seed)
    fake = images_in_batches(gen, prompts, g, batch_size)
    captions = captions_in_batches(gen, real, g, batch_size)
    ref_features = classifier_features(classifier, reference)
    return {
        "fid_fashion_classifier": frechet_distance_of(classifier_features(classifier, fake), ref_features),
        "fid_fashion_classifier/real": frechet_distance_of(
            classifier_features(classifier, other_real), ref_features
        ),
        "class_accuracy": class_accuracy(classifier, fake, labels),
        "class_accuracy/real": class_accuracy(classifier, real, labels),
        "clip_score_motfusion": clip_score(clip, fake, prompts),
        "clip_score_motfusion/real": clip_score(clip, real, prompts),
        "caption_accuracy": sum(caption_names_class(c, int(y)) for c, y in zip(captions, labels)) / n,
        "n": n,
        "n_reference": n_reference,
    }


def evaluate_emoji(
    gen: Generator, cfg: Config, clip: ClipModel, *, n: int = 200, seed: int = 0, batch_size: int = 50
) -> dict[str, float]:
    """Text to image from the names of the (held-out) val emoji; clip_score_motfusion of the results,
    and of the real emoji as the ceiling."""
    val = build_dataset(suite_config(cfg, "emoji"), "val")
    samples = [val.sample(i) for i in range(min(n, len(val)))]
    prompts = [s.caption for s in samples]
    g = torch.Generator(device=gen.device).manual_seed(seed)
    fake = images_in_batches(gen, prompts, g, batch_size)
    return {
        "clip_score_motfusion": clip_score(clip, fake, prompts),
        "clip_score_motfusion/real": clip_score(clip, torch.stack([s.image for s in samples]), prompts),
        "n": len(samples),
    }
