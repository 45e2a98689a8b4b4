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


LAST_POSITION_SLICE = "/lm_head/last_position"  # the node prune_to_last_position inserts


def _consumers(model, name: str) -> list[Any]:
    return [n for n in model.graph.node if name in n.input]


def prune_to_last_position(model) -> bool:
    """Feed the LM head the last position's hidden state only: `logits` becomes [B, 1, V] at prefill too.

    Why: prefill computes the head (hidden x vocab, ~20 % of SmolLM2-135M's MACs at 128 tokens) for every
    prompt position, and generation reads the last one. onnxruntime-genai (0.18, its builder's
    `prune_lm_head`) takes such a graph as it is: a logits output whose dim 1 is the constant 1 marks it
    "pruned" and its generator reads that row. One Slice (genai's builder uses Gather + Unsqueeze: one node
    more per decode step) on the head's input, ahead of anything computed from it for the head alone (the
    block sums of append_offset_blocks). Perplexity needs every position: dlopt.lm runs such a graph through
    all_position_logits. Batches padded on the right would read a pad position's logits, as genai's own
    pruned builds do. Returns False (model unchanged) when the graph is not the genai form (logits made
    by one MatMul/MatMulNBits from a hidden state used only for the head) or is already pruned."""
    from onnx import helper, numpy_helper

    outputs = [o for o in model.graph.output if o.name == "logits"]
    producers = {o: n for n in model.graph.node for o in n.output}
    if not outputs or "logits" not in producers or any(n.name == LAST_POSITION_SLICE for n in model.graph.node):
        return False
    head = producers["logits"]
    if head.op_type not in ("MatMul", "MatMulNBits"):
        return False
    hidden = head.input[0]
    concat = producers.get(hidden)
    if concat is not None and concat.op_type == "Concat" and concat.name == f"{concat.input[0]}__block_sums_concat":
        hidden = concat.input[0]  # append_offset_blocks' [x, S(x)]: its nodes are named after x
    head_only = {id(head)} | {id(n) for n in model.graph.node if n.name.startswith(f"{hidden}__block_sums")}
    if hidden in {o.name for o in model.graph.output} or any(id(c) not in head_only for c in _consumers(model, hidden)):
        return False
    last = f"{hidden}__last_position"
    consts = [
        numpy_helper.from_array(np.array([-1], np.int64), f"{LAST_POSITION_SLICE}_start"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{LAST_POSITION_SLICE}_end"),
        numpy_helper.from_array(np.array([1], np.int64), f"{LAST_POSITION_SLICE}_axis"),
    ]
    model.graph.initializer.extend(consts)
    for node in model.graph.node:
        if id(node) in head_only:
            for k, name in enumerate(node.input):
                if name == hidden:
                    node.input[k] = last
    slice_node = helper.make_node("Slice", [hidden, *(c.name for c in consts)], [last], name=LAST_POSITION_SLICE)
    position = min(k for k, n in enumerate(model.graph.node) if id(n) in head_only)
    model.graph.node.insert(position, slice_node)
    dims = outputs[0].type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].Clear()
        dims[1].dim_value = 1
    return True


def is_last_position_only(model) -> bool:
    """Whether the graph's logits are the last position's only (prune_to_last_position's form)."""
    return any(n.name == LAST_POSITION_SLICE for n in model.graph.node)


def all_position_logits(model):
    """A copy of a prune_to_last_position graph with the logits of every position (perplexity and
    next-token agreement read them); other graphs are returned as they are."""
    import onnx

    if not is_last_position_only(model):
        return model
    full = onnx.ModelProto()
    full.CopyFrom(model)
    node = next(n for n in full.graph.node if n.name == LAST_POSITION_SLICE)
    for consumer in _consumers(full, node.output[0]):
        for k, name in enumerate(consumer.input):
            if name == node.output[0]:
                consumer.input[k] = node.input[0]
    full.graph.node.remove(node)
    for output in full.graph.output:
        dims = output.type.tensor_type.shape.dim
        if output.name == "logits" and len(dims) == 3:
            dims[1].Clear()
            dims[1].dim_param = "sequence_length"
    return full


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
    """A CPU session of an LM graph with the logits of every position (all_position_logits): an
    onnx.ModelProto, or a model.onnx path opened where it lies (its external data beside it;
    dlopt.sessions.cpu_session may stage a path elsewhere, which ORT 1.32 then refuses: "external data path
    escapes model directory")."""
    import onnx
    import onnxruntime as ort

    from dlopt.sessions import cpu_session, session_options

    if not isinstance(model, onnx.ModelProto):
        graph = onnx.load(str(model), load_external_data=False)
        if is_last_position_only(graph):  # rewritten in memory, weights loaded: the folder stays as it is
            model = onnx.load(str(model))
    if isinstance(model, onnx.ModelProto):
        return cpu_session(all_position_logits(model), threads=threads, error=StageError, hint="report this model")
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


def heldout_fidelity(
    model: str | os.PathLike,
    reference: str | os.PathLike,
    text: str | os.PathLike,
    threads: int = 1,
    what: str = "held-out text",
) -> dict[str, Any]:
    """lm_fidelity of the LM folder `model` against the LM folder `reference` (its FP32 export) on held-out
    UTF-8 `text`, in windows of EVAL_WINDOW tokens (the context if shorter), at most EVAL_MAX_WINDOWS of
    them; with `window`, the window length used. InputError when the text has not one window."""
    genai = read_genai_config(model)
    read_genai_config(reference)
    tokens = read_text_tokens(model, text, what)
    window = min(EVAL_WINDOW, int(genai["model"]["context_length"]))
    pieces = windows(tokens, window)[:EVAL_MAX_WINDOWS]
    if not pieces:
        raise InputError(
            f"{text} has {tokens.shape[0]} tokens, fewer than one {window}-token window",
            f"give at least {window} tokens of held-out text",
        )
    head = int(genai["model"]["decoder"]["head_size"])
    found = lm_fidelity(Path(reference) / "model.onnx", Path(model) / "model.onnx", pieces, head, threads=threads)
    return {**found, "window": window}


__all__ = [
    "EVAL_MAX_WINDOWS",
    "EVAL_WINDOW",
    "GENAI_CONFIG",
    "LAST_POSITION_SLICE",
    "all_position_logits",
    "heldout_fidelity",
    "is_last_position_only",
    "is_lm_folder",
    "lm_fidelity",
    "lm_session",
    "prefill_feeds",
    "prune_to_last_position",
    "read_genai_config",
    "read_text_tokens",
    "tokenize_text",
    "windows",
]
