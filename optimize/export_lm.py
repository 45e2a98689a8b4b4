"""Export a decoder language model for generation: an ONNX decoder with a KV cache, its tokenizer and
genai_config.json, in one folder that onnxruntime-genai loads as it is (`og.Model(folder)`).

The graph itself comes from onnxruntime-genai's model builder (`onnxruntime_genai.models.builder`):
it writes the layout ONNX Runtime's fused CPU kernels expect (GroupQueryAttention with rotary
embedding inside, SkipSimplifiedLayerNormalization, fused QKV projections, a KV cache of
`past_key_values.{i}.key/value` [B, kv_heads, past, head_dim] whose past and present buffers are
shared), and it is maintained with those kernels. Rewriting that exporter here would only fall
behind it. What dlopt adds on top, and why:
- verification: the builder checks nothing. The export is compared with transformers on the same
  source, through onnxruntime-genai as a user runs it, over the prefill and DECODE_STEPS decode steps
  with the KV cache (logits within a stated tolerance, the same greedy token at every step, and the
  same free-running greedy continuation); a mismatch writes nothing and is exit 1.
- the bundle: the folder appears complete or not at all (built beside -o, renamed into place after
  verification), with export.json recording the source, the graph's fused ops and KV-cache inputs and
  the verification, so later stages (quantize, package, bench --generate) know what they were given.
- clear errors: a folder without a tokenizer, a model that is not a causal LM, or an architecture the
  builder does not support is one line and exit 2 before minutes of work (the builder's own failures
  are tracebacks or, for a missing tokenizer, a half-written folder).
The builder runs in a child process: it prints progress bars and warnings by the page, and its peak
memory (a second copy of the weights) is returned to the system when it ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError, MissingDependencyError, StageError, VerificationError
from dlopt.fileio import check_output_folder, usual_permissions
from dlopt.genai import require_genai

DECODE_STEPS = 8
# fp32 logits of the fused graph against transformers: max |diff| <= ATOL + RTOL * max |reference|,
# per step. Measured (Zen 4): the tiny test model ~2e-7; SmolLM2-135M (30 layers) <= 1e-4 of logits up to
# ~30 (tolerance 0.02-0.03 there): fp32 kernels differ in summation order only, so a real error stands out.
ATOL = 1e-3
RTOL = 1e-3
VERIFY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small language model writes text one token at a "
    "time, and each new token reads the keys and values of every token before it from the cache."
)
MAX_VERIFY_PROMPT = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
REFERENCE_MODELS = ("smollm2",)
LLM_EXTRA_HINT = "pip install 'dlopt[llm]'"


@dataclass(frozen=True, kw_only=True)
class ExportLm:
    """How a decoder LM is exported for generation (only fp32 here: 4-bit is quantize's job)."""

    VERSION = 1
    precision: str = "fp32"
    decode_steps: int = DECODE_STEPS
    atol: float = ATOL
    rtol: float = RTOL


@dataclass(frozen=True)
class StepCheck:
    step: int  # 0: the prefill (every prompt position); k > 0: the k-th decode step (one new token)
    max_abs_diff: float
    tolerance: float
    reference_token: int
    exported_token: int
    top2_margin: float  # reference's top-1 minus top-2 logit: a tie within the diff may flip argmax

    @property
    def passed(self) -> bool:
        same = self.reference_token == self.exported_token or self.top2_margin <= self.max_abs_diff
        return self.max_abs_diff <= self.tolerance and same


@dataclass(frozen=True)
class LmExport:
    folder: Path
    report: dict[str, Any] = field(repr=False)


def check_hf_folder(folder: Path) -> dict[str, Any]:
    """The checks a Hugging Face causal-LM folder must pass before any slow work; returns its config.json."""
    if not folder.exists():
        raise InputError(
            f"{folder} does not exist",
            "give a Hugging Face causal LM folder (config.json, weights, tokenizer) or smollm2",
        )
    if not folder.is_dir():
        raise InputError(
            f"{folder} is not a folder",
            "--task text-generation exports a Hugging Face model folder (config.json, weights, tokenizer) or smollm2",
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"{folder} has no config.json", "save the model with model.save_pretrained(folder)")
    from dlopt.genai import check_causal_lm_config

    config = check_causal_lm_config(config_path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)})",
            "save it beside the model: tokenizer.save_pretrained(folder)",
        )
    return config


def graph_facts(model_path: Path) -> dict[str, Any]:
    """Op types, fused layers and the KV-cache inputs of the exported decoder (weights not loaded)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    cache = [i for i in model.graph.input if i.name.startswith("past_key_values.")]

    def dims(value_info) -> list[Any]:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    return {
        "op_types": dict(sorted(ops.items())),
        "fused": {
            op: ops.get(op, 0)
            for op in (
                "GroupQueryAttention",
                "SkipSimplifiedLayerNormalization",
                "SimplifiedLayerNormalization",
                "RotaryEmbedding",
            )
        },
        "fused_qkv": any("qkv_proj" in t.name for t in model.graph.initializer),
        "inputs": {i.name: dims(i) for i in model.graph.input if not i.name.startswith("past_key_values.")},
        "kv_cache": {"tensors": len(cache), "example": {cache[0].name: dims(cache[0])} if cache else {}},
        "outputs": [o.name for o in model.graph.output if not o.name.startswith("present.")],
    }


def _run_builder(source: Path, out: Path, precision: str, cache: Path, log: Callable[[str], None]) -> None:
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(source),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    log(f"building the {precision} decoder with onnxruntime-genai's model builder")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()][-1:] or ["(no output)"]
        if "not currently supported" in done.stderr + done.stdout:
            raise InputError(
                f"onnxruntime-genai's model builder does not support {source}: {tail[0]}",
                "supported: Llama, Mistral, Qwen2/3, Phi, Gemma, Granite, OLMo ... (see its builder.py)",
            )
        raise StageError(
            f"onnxruntime-genai's model builder failed on {source}: {tail[0]}",
            "rerun with --debug, or report this model",
        )


def _reference_logits(hf_folder: Path, prompt: np.ndarray, steps: int) -> tuple[list[np.ndarray], list[int]]:
    """transformers' logits for the prompt (all positions) and for `steps` greedy decode steps with its
    KV cache, and the greedy tokens (steps + 1: the last decode step's choice too)."""
    import warnings

    import torch
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the cache keyword's deprecation notes, the loading bar
    transformers.utils.logging.disable_progress_bar()
    logits, tokens = [], []
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = model(input_ids=torch.from_numpy(prompt.astype(np.int64)), use_cache=True)
            for step in range(steps + 1):
                step_logits = out.logits[0].float().numpy()
                logits.append(step_logits)
                tokens.append(int(step_logits[-1].argmax()))
                if step == steps:
                    break
                out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    del model
    return logits, tokens


def _genai_model(og, folder: Path, threads: int = 1):
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def verify_export(
    folder: Path, hf_folder: Path, config: ExportLm = ExportLm(), log: Callable[[str], None] = lambda message: None
) -> dict[str, Any]:
    """Compare the exported folder (run by onnxruntime-genai) with transformers on `hf_folder`: the
    prefill's logits at every prompt position, then `decode_steps` steps each fed the reference's greedy
    token (teacher forcing, so one early flip does not hide how close the rest is), then the export's own
    free-running greedy continuation. Returns the verification record; raises nothing (see `passed`)."""
    import transformers

    og = require_genai()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    ids = tokenizer(VERIFY_TEXT, add_special_tokens=False)["input_ids"][:MAX_VERIFY_PROMPT]
    if len(ids) < 2:
        raise InputError(
            f"the tokenizer in {hf_folder} turns the verification text into {len(ids)} token(s)",
            "check that the tokenizer belongs to the model",
        )
    prompt = np.asarray([ids], dtype=np.int32)
    steps = config.decode_steps
    log(f"verifying against transformers: a {prompt.shape[1]}-token prompt, prefill + {steps} decode steps")
    reference, reference_tokens = _reference_logits(hf_folder, prompt, steps)

    model = _genai_model(og, folder)
    params = og.GeneratorParams(model)
    total = prompt.shape[1] + steps + 1
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    checks = []
    for step in range(steps + 1):
        generator.append_tokens(prompt if step == 0 else np.asarray([[reference_tokens[step - 1]]], dtype=np.int32))
        got = np.asarray(generator.get_output("logits"), dtype=np.float32)[0]
        want = reference[step]
        if got.shape != want.shape:
            raise VerificationError(
                f"the export's logits have shape {list(got.shape)} at step {step}, transformers' {list(want.shape)}",
                "report this model",
            )
        top2 = np.sort(want[-1])[-2:]
        checks.append(
            StepCheck(
                step=step,
                max_abs_diff=float(np.abs(got - want).max()),
                tolerance=config.atol + config.rtol * float(np.abs(want).max()),
                reference_token=reference_tokens[step],
                exported_token=int(got[-1].argmax()),
                top2_margin=float(top2[1] - top2[0]),
            )
        )
    del generator

    # the export's own greedy continuation, as a user's generate loop produces it
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    free_running = []
    while not generator.is_done():
        generator.generate_next_token()
        free_running.append(int(generator.get_next_tokens()[0]))
    del generator, model
    continuation_equal = free_running == reference_tokens
    passed = all(c.passed for c in checks) and continuation_equal
    return {
        "passed": passed,
        "reference": "transformers, float32, with its KV cache",
        "prompt_tokens": int(prompt.shape[1]),
        "decode_steps": steps,
        "tolerance": f"max |logit diff| <= {config.atol:g} + {config.rtol:g} * max |reference logit|, per step; "
        "the same greedy token at every step (unless the reference's top-2 margin is within the diff)",
        "steps": [
            {
                "step": c.step,
                "max_abs_diff": c.max_abs_diff,
                "tolerance": c.tolerance,
                "reference_token": c.reference_token,
                "exported_token": c.exported_token,
                "top2_margin": c.top2_margin,
                "passed": c.passed,
            }
            for c in checks
        ],
        "greedy_reference": reference_tokens,
        "greedy_exported": free_running,
        "greedy_equal": continuation_equal,
    }


def _mismatch_text(verification: dict[str, Any]) -> str:
    failed = [s for s in verification["steps"] if not s["passed"]]
    if failed:
        s = failed[0]
        where = "the prefill" if s["step"] == 0 else f"decode step {s['step']}"
        return (
            f"at {where}: max |logit diff| {s['max_abs_diff']:.3g} (tolerance {s['tolerance']:.3g}), greedy token "
            f"{s['exported_token']} vs transformers' {s['reference_token']}"
        )
    return (
        f"greedy continuation {verification['greedy_exported']} differs from transformers' "
        f"{verification['greedy_reference']}"
    )


def _folder_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def export_text_generation(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: ExportLm = ExportLm(),
    *,
    log: Callable[[str], None] = lambda message: None,
) -> LmExport:
    """Export SOURCE (a Hugging Face causal-LM folder, or "smollm2") for generation into the folder
    `output`: model.onnx (+ .data), genai_config.json, the tokenizer files and export.json. Verified
    against transformers before anything appears at `output`; raises VerificationError on a mismatch
    (nothing written), InputError on bad input."""
    if config.precision != "fp32":
        raise InputError(
            f"text-generation export writes fp32, not {config.precision!r}", "quantize the exported folder afterwards"
        )
    if config.decode_steps < 1:
        raise InputError(f"decode steps must be at least 1, got {config.decode_steps}", "e.g. 8")
    out = Path(output)
    name = str(source)
    is_reference = name in REFERENCE_MODELS
    hf_config: dict[str, Any] = {} if is_reference else check_hf_folder(Path(source))  # the reference's: below
    check_output_folder(out)
    require_genai()
    if importlib.util.find_spec("onnx_ir") is None:
        raise MissingDependencyError("onnxruntime-genai's model builder needs onnx_ir", LLM_EXTRA_HINT)

    parent = out.parent if str(out.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=parent) as work:
        work_dir = Path(work)
        if is_reference:
            from dlopt.models import smollm2

            log("loading smollm2 (SmolLM2-135M-Instruct, the GGUF dequantized to float32; ~100 s)")
            hf_folder = smollm2.save_hf_folder(work_dir / "hf")
            hf_config = json.loads((hf_folder / "config.json").read_text())
        else:
            hf_folder = Path(source)
        staged = work_dir / "export"
        _run_builder(hf_folder, staged, config.precision, work_dir / "cache", log)
        verification = verify_export(staged, hf_folder, config, log)
        if not verification["passed"]:
            raise VerificationError(
                f"the exported decoder differs from transformers {_mismatch_text(verification)}; nothing written",
                "report this model",
            )
        og = require_genai()
        report = {
            "stage": "export",
            "task": "text-generation",
            "source": name if is_reference else str(Path(source).resolve()),
            "architecture": (hf_config.get("architectures") or ["?"])[0],
            "config": {
                "precision": config.precision,
                "decode_steps": config.decode_steps,
                "atol": config.atol,
                "rtol": config.rtol,
            },
            "exporter": f"onnxruntime-genai {og.__version__} model builder",
            "graph": graph_facts(staged / "model.onnx"),
            "files": _folder_bytes(staged),
            "bytes": sum(_folder_bytes(staged).values()),
            "verification": verification,
        }
        (staged / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        usual_permissions(staged)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(staged, out)
    return LmExport(out, report)


__all__ = [
    "ATOL",
    "DECODE_STEPS",
    "ExportLm",
    "LmExport",
    "RTOL",
    "StepCheck",
    "check_hf_folder",
    "export_text_generation",
    "graph_facts",
    "verify_export",
]
