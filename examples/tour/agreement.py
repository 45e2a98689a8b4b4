"""A user's metric for the tour's model (docs/adding-a-metric.md): top-2 agreement, the share of samples
whose two highest-scoring digits are the same two as FP32's, with the top-1 agreement as a component.
dlopt calls it as score(reference_outputs, outputs): dicts of output name -> array over all samples."""

from __future__ import annotations

import numpy as np


def score(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, float]:
    ref, got = reference["logits"], outputs["logits"]
    top2 = lambda a: np.sort(np.argsort(a, axis=1)[:, -2:], axis=1)  # noqa: E731
    return {"top2_agreement": float((top2(ref) == top2(got)).all(axis=1).mean()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean())}
