"""Exported language-model folders run as onnxruntime-genai runs them (what `dlopt export --task
text-generation` writes and `og.Model(folder)` loads as it is): their checks and greedy generation
(perplexity of LM folders is dlopt.lm's).

For package, verify, gate and bench --generate:
- `check_lm_folder`: the one-line errors for a folder that is not an exported LM (a Hugging Face
  folder, a BERT encoder, no tokenizer);
- `greedy_generate` / `check_greedy`: a prompt's greedy continuation, and the re-check of a recorded
  one (each recorded token fed back in turn, so one near-tie cannot hide how the rest compares).

Logits come from onnxruntime-genai's own generator (`append_tokens`, `get_output("logits")`), so what
is checked is what a user's generate loop runs: the same session options, KV cache and kernels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError, MissingDependencyError
from dlopt.lm import GENAI_CONFIG

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
EXPORT_HINT = "export one with: dlopt export HF_FOLDER --task text-generation -o FOLDER"
# A recorded greedy token still counts as the model's choice when its logit is within this of the top
# logit (relative to the largest |logit|): another CPU's kernels (AVX2 against AVX-512, int4 blocks
# summed in another order) may break an exact tie the other way; a real change is far larger.
TIE_RTOL = 1e-4


def require_genai():
    """onnxruntime_genai, or a MissingDependencyError naming the extra (export, quantize, bench, gate and
    package of LM folders all need it)."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise MissingDependencyError(
            "exported LM folders run with onnxruntime-genai, which is not installed", "pip install 'dlopt[llm]'"
        ) from e
    return og


@dataclass(frozen=True)
class LmFolder:
    """An exported generation folder, as read from its genai_config.json."""

    path: Path
    context_length: int
    vocab_size: int
    special_ids: tuple[int, ...]
    size_bytes: int


def read_lm_folder(path: str | os.PathLike) -> LmFolder:
    folder = Path(path)
    config_path = folder / GENAI_CONFIG
    if not folder.is_dir() or not config_path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {GENAI_CONFIG}"
        raise InputError(f"{folder} {what}: not an exported LM folder", EXPORT_HINT)
    try:
        model = json.loads(config_path.read_text())["model"]
        context, vocab = int(model["context_length"]), int(model["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"cannot read the context length and vocabulary size from {config_path}: {e}", "export the folder again"
        ) from e
    special = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = model.get(key)
        special += value if isinstance(value, list) else [value] if value is not None else []
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith("model"))
    return LmFolder(folder, context, vocab, tuple(int(v) for v in special), size)


def load_lm(og, folder: LmFolder, threads: int):
    """og.Model on the CPU with `threads` intra-op threads (genai's config overlay: the folder is not changed)."""
    config = og.Config(str(folder.path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    try:
        return og.Model(config)
    except Exception as e:  # genai raises plain RuntimeErrors for unloadable folders
        raise InputError(
            f"onnxruntime-genai cannot load {folder.path}: {str(e).splitlines()[0]}",
            "export the folder again with dlopt export --task text-generation",
        ) from e


def check_causal_lm_config(config_path: Path) -> dict[str, Any]:
    """A Hugging Face config.json that describes a causal LM (architectures *ForCausalLM), or InputError."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {config_path}: {e}", "save the model again with save_pretrained") from e
    architectures = [str(a) for a in config.get("architectures") or []]
    if not any(a.endswith("ForCausalLM") for a in architectures):
        what = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
        raise InputError(
            f"{config_path} describes {what}, not a causal language model",
            "text generation takes decoder LMs (*ForCausalLM: Llama, Qwen, Phi, Mistral, Gemma ...)",
        )
    return config


def check_lm_folder(path: str | os.PathLike, *, tokenizer: bool = True) -> LmFolder:
    """The folder as an exported LM, or InputError (exit 2) naming the file that is missing and the fix."""
    folder = Path(path)
    if folder.is_dir() and not (folder / GENAI_CONFIG).is_file() and (folder / "config.json").is_file():
        check_causal_lm_config(folder / "config.json")
        raise InputError(
            f"{folder} is a Hugging Face model folder, not an exported LM (no {GENAI_CONFIG})",
            f"export it first: dlopt export {folder} --task text-generation -o FOLDER",
        )
    lm = read_lm_folder(folder)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)})",
            "copy the tokenizer files of the source model into it (tokenizer.save_pretrained(folder))",
        )
    return lm


def open_lm(folder: LmFolder, threads: int = 1):
    """(onnxruntime_genai module, og.Model, og.Tokenizer) for the folder."""
    og = require_genai()
    model = load_lm(og, folder, threads)
    return og, model, og.Tokenizer(model)


@dataclass(frozen=True)
class Greedy:
    tokens: list[int]  # the new tokens, without the prompt
    stopped: str  # "length" (new_tokens made) or "eos"


def check_prompt_fits(folder: LmFolder, prompt_tokens: int, new_tokens: int, what: str) -> None:
    if new_tokens < 1:
        raise InputError(f"new tokens must be at least 1, got {new_tokens}", "e.g. {new_tokens=20}")
    if prompt_tokens + new_tokens > folder.context_length:
        raise InputError(
            f"{what} is {prompt_tokens} tokens; with {new_tokens} new tokens it exceeds the context of "
            f"{folder.path} ({folder.context_length} tokens, {GENAI_CONFIG})",
            "shorten the prompt or lower {new_tokens}",
        )


def greedy_generate(og, model, prompt_ids: Sequence[int], new_tokens: int) -> Greedy:
    """Greedy continuation of `prompt_ids`, up to `new_tokens` tokens (it stops early at EOS)."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([list(prompt_ids)], dtype=np.int32))
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    del generator
    return Greedy(tokens, "length" if len(tokens) >= new_tokens else "eos")


def equal_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens two generations share."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def judge_recorded_tokens(
    next_logits: Callable[[Sequence[int]], np.ndarray],
    prompt_ids: Sequence[int],
    recorded: Sequence[int],
    *,
    tie_rtol: float = TIE_RTOL,
    subject: str = "model",
) -> dict[str, Any]:
    """Is `recorded` the greedy continuation of `prompt_ids` by the runner behind `next_logits` (the logits
    [V] of the next token after appending the given tokens to what it was fed before)? The prompt is fed, then
    each recorded token in turn. Passed when each recorded token is the argmax, or within tie_rtol * max
    |logit| of it. Returns {passed, steps, equal, first_difference, first_gap, detail}: first_gap is the
    runner's logit of its own choice minus its logit of the recorded token at the first difference."""
    feed = list(prompt_ids)
    equal, first, first_gap, detail, passed = 0, None, None, "", True
    for step, want in enumerate(recorded):
        logits = next_logits(feed)
        got = int(logits.argmax())
        if got == want:
            equal += 1
        else:
            gap = float(logits[got] - logits[want])
            tie = tie_rtol * float(np.abs(logits).max())
            if first is None:
                first, first_gap = step, gap
                detail = (
                    f"token {step + 1}: the {subject}'s greedy choice is {got}, the manifest's {want} "
                    f"(logit gap {gap:.3g}, tie tolerance {tie:.3g})"
                )
            if gap > tie:
                passed = False
        feed = [want]
    return {
        "passed": passed,
        "steps": len(recorded),
        "equal": equal,
        "first_difference": first,
        "first_gap": first_gap,
        "detail": detail,
    }


def check_greedy(
    og, model, prompt_ids: Sequence[int], recorded: Sequence[int], *, tie_rtol: float = TIE_RTOL
) -> dict[str, Any]:
    """judge_recorded_tokens on an onnxruntime-genai model: its generator fed the prompt, then each
    recorded token."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + len(recorded))
    generator = og.Generator(model, params)

    def next_logits(feed: Sequence[int]) -> np.ndarray:
        generator.append_tokens(np.asarray([list(feed)], dtype=np.int32))
        return np.asarray(generator.get_output("logits"), dtype=np.float32)[0, -1]

    return judge_recorded_tokens(next_logits, prompt_ids, recorded, tie_rtol=tie_rtol)


__all__ = [
    "EXPORT_HINT",
    "Greedy",
    "TIE_RTOL",
    "TOKENIZER_FILES",
    "check_causal_lm_config",
    "check_greedy",
    "check_lm_folder",
    "check_prompt_fits",
    "equal_prefix",
    "greedy_generate",
    "judge_recorded_tokens",
    "open_lm",
]
