"""Train the tour's model on scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped with
scikit-learn) and write what a user brings to dlopt: the weights and their data as .npz files.

    python examples/tour/train.py     # under a minute on 2 cores: digits.pt beside this file; calib.npz, val.npz here

calib.npz: 300 training images (the `image` input, samples on axis 0), for calibration.
val.npz:   the 450 held-out images with their `labels`, for accuracy (never calibrated on).
"""

from __future__ import annotations

import numpy as np
import torch
from model import WEIGHTS, DigitsCNN  # beside this file
from sklearn.datasets import load_digits


def main() -> None:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8], pixels 0..1
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    train, held = order[:-450], order[-450:]

    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    for _epoch in range(10):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(images[held])).argmax(1).numpy() == labels[held]).mean()
    torch.save(model.state_dict(), WEIGHTS)
    np.savez("calib.npz", image=images[train[:300]])
    np.savez("val.npz", image=images[held], labels=labels[held])
    print(f"wrote {WEIGHTS.name}, calib.npz, val.npz; held-out accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
