"""Exported LM folders (genai_config.json + model.onnx, as `dlopt export --task text-generation` writes): their
tokenizer, one prefill with an empty KV cache in plain ONNX Runtime, and the LM row of the fidelity
table (dlopt.metrics.Perplexity: perplexity over FP32's and greedy next-token agreement) on held-out text.

Used by `dlopt quantize LM --precision int4` (calibration, the held-out check) and `dlopt eval LM --reference
FP32_LM --data TEXT.txt`. A prefill over a window gives the logits at every position, which is what
perplexity and next-token agreement read; generation speed is dlopt.bench.generate's (onnxruntime-genai).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError, StageError

GENAI_CONFIG = "genai_config.json"
EVAL_WINDOW = 512  # tokens per perplexity window (the SmolLM2 figures), or the context if shorter
EVAL_MAX_WINDOWS = 16


def is_lm_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / GENAI_CONFIG).is_file()


def read_genai_config(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    for name in (GENAI_CONFIG, "model.onnx"):
        if not (folder / name).is_file():
            raise InputError(
                f"{folder} has no {name}: an exported LM folder is needed",
                "export one with: dlopt export SOURCE --task text-generation -o FOLDER",
            )
    try:
        config = json.loads((folder / GENAI_CONFIG).read_text())
        decoder = config["model"]["decoder"]
        int(decoder["head_size"]), int(config["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read {folder / GENAI_CONFIG}: {e}", "export the folder again") from e
    if decoder.get("filename", "model.onnx") != "model.onnx":
        raise InputError(
            f"{folder / GENAI_CONFIG} names {decoder.get('filename')!r}, not model.onnx",
            "use folders written by dlopt export --task text-generation",
        )
    return config


def tokenize_text(folder: str | os.PathLike, text: str) -> np.ndarray:
    """The text's token ids with the folder's own tokenizer (transformers reads tokenizer.json/.model)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # noqa: BLE001 - any failure to read the tokenizer is the folder's problem
            raise InputError(f"cannot load the tokenizer in {folder}: {e}", "export the folder again") from e
        # a text longer than the context is fine here: it is cut into windows (no "sequence too long" note)
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    finally:
        transformers.logging.set_verbosity(verbosity)


def read_text_tokens(folder: str | os.PathLike, path: str | os.PathLike, what: str = "text") -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist", "give a UTF-8 text file (.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as UTF-8 text: {e}", "give a plain UTF-8 .txt file") from e
    return tokenize_text(folder, text)


def windows(tokens: np.ndarray, window: int) -> list[np.ndarray]:
    """Consecutive non-overlapping `window`-token pieces (the tail shorter than a window is dropped)."""
    return [tokens[i : i + window] for i in range(0, tokens.shape[0] - window + 1, window)]


def prefill_feeds(model, ids: np.ndarray, head_size: int) -> dict[str, np.ndarray]:
    """Feeds of one prefill over `ids` [T] (batch 1) with an empty KV cache, for the genai graph (its
    cache inputs are [B, kv_heads, past, head_size]; head_size is symbolic there: genai_config's)."""
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids[None].astype(np.int64),
        "attention_mask": np.ones((1, ids.shape[0]), np.int64),
    }
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            feeds[value.name] = np.zeros((1, dims[1], 0, dims[3] or head_size), np.float32)
        elif value.name == "position_ids":
            feeds["position_ids"] = np.arange(ids.shape[0], dtype=np.int64)[None]
    return feeds


def lm_session(model, threads: int = 1):
    """A CPU session of an LM graph: an onnx.ModelProto, or a model.onnx path opened where it lies (its
    external data beside it; dlopt.sessions.cpu_session may stage a path elsewhere, which ORT 1.32 then
    refuses: "external data path escapes model directory")."""
    import onnx
    import onnxruntime as ort

    from dlopt.sessions import cpu_session, session_options

    if isinstance(model, onnx.ModelProto):
        return cpu_session(model, threads=threads, error=StageError, hint="report this model")
    try:
        return ort.InferenceSession(
            str(model), sess_options=session_options(threads=threads), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own exception types
        raise InputError(
            f"ONNX Runtime cannot load {model}: {str(e).strip().splitlines()[0][:300]}", "export the folder again"
        ) from e


def lm_fidelity(reference, candidate, pieces: Sequence[np.ndarray], head_size: int, threads: int = 1) -> dict[str, Any]:
    """dlopt.metrics' LM row of `candidate` against `reference` (onnx.ModelProto or model.onnx paths) on the
    token windows `pieces`: perplexity of each, their ratio, and greedy next-token agreement."""
    import onnx

    from dlopt.metrics import Perplexity

    graphs = [
        onnx.load(str(m), load_external_data=False) if not isinstance(m, onnx.ModelProto) else m
        for m in (reference, candidate)
    ]
    threads = threads or os.cpu_count() or 1  # 0: all cores
    sessions = [lm_session(m, threads) for m in (reference, candidate)]
    metric = Perplexity()
    for ids in pieces:
        feeds = prefill_feeds(graphs[0], ids, head_size)
        ref, cand = (s.run(["logits"], feeds)[0] for s in sessions)
        metric.add([ref], [cand], {"input_ids": feeds["input_ids"]})
    value = metric.result()
    return {
        "tokens": value.components["tokens"],
        "windows": len(pieces),
        "perplexity_ratio": value.value,
        "fp32_perplexity": value.components["fp32_perplexity"],
        "perplexity": value.components["candidate_perplexity"],
        "next_token_agreement": value.components["next_token_agreement"],
    }


__all__ = [
    "EVAL_MAX_WINDOWS",
    "EVAL_WINDOW",
    "GENAI_CONFIG",
    "is_lm_folder",
    "lm_fidelity",
    "lm_session",
    "prefill_feeds",
    "read_genai_config",
    "read_text_tokens",
    "tokenize_text",
    "windows",
]
