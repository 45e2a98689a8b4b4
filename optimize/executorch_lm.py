"""A decoder LM as an ExecuTorch program for XNNPACK: the mobile path beside onnxruntime-genai's.

ExecuTorch runs a .pte program with a static KV cache held in the program's own mutable buffers. The
program is made from the Hugging Face model with well-kept libraries only:
- transformers' ExecuTorch integration (`TorchExportableModuleWithStaticCache`): the model with a
  StaticCache registered as buffers, exported by torch.export with the sequence length dynamic, so one
  `forward(input_ids [1, T], cache_position [T])` method does the prefill (T = prompt length) and every
  decode step (T = 1);
- optionally torchao's 8da4w through ExecuTorch's `quantize_model_` (int8 activations quantized per
  run, int4 weights in groups, HQQ scales): the scheme ExecuTorch's LLM exporter uses for XNNPACK;
- `to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])` and `.to_executorch()`.
What dlopt adds: the program returns the last position's logits only (`logits_to_keep=1`; the
library's wrapper returns every position's, and the prefill's lm head over all of them is wasted work
that no generation reads: 128 x 49,152 x 576 MACs for SmolLM2's 128-token prompt), the greedy
generation and its re-check on the program as a phone runs it (`PteLm`), and one-line errors.
ExecuTorch's own LLM exporter (executorch.extension.llm.export) needs torchtune and Meta's checkpoint
layout; this path takes the Hugging Face folder as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError, StageError
from dlopt.quiet import quiet_libraries
from dlopt.targets.xnnpack import require_executorch, set_threads

PRECISIONS = ("fp32", "8da4w")
INPUT_NAMES = ("input_ids", "cache_position")
DEFAULT_GROUP_SIZE = 32
DEFAULT_CONTEXT = 512  # the static cache's length: prompt + new tokens must fit (memory and attention scale with it)


@dataclass(frozen=True, kw_only=True)
class PteLmConfig:
    """How the LM is lowered: `precision` fp32 or 8da4w (int4 weights in `group_size` blocks along the
    input, int8 dynamic activations; the embedding int8 per row), a static cache of `context` tokens.
    `block_offsets` (8da4w): each int4 block on its own min..max grid (a real zero point), run as XNNPACK's
    symmetric int4 codes plus a per-block offset (see quantize_8da4w); False: torchao's symmetric grid only."""

    precision: str = "8da4w"
    group_size: int = DEFAULT_GROUP_SIZE
    context: int = DEFAULT_CONTEXT
    block_offsets: bool = True


def check_config(config: PteLmConfig) -> None:
    if config.precision not in PRECISIONS:
        raise InputError(f"unknown .pte precision {config.precision!r} for an LM", f"choose {' or '.join(PRECISIONS)}")
    if config.group_size < 2 or config.group_size % 2:
        raise InputError(f"group size {config.group_size} must be an even number >= 2", "e.g. 32")
    if config.context < 2:
        raise InputError(f"the .pte's context must be at least 2 tokens, got {config.context}", "e.g. 512")


def _last_logits_module(model, context: int):
    """transformers' static-cache wrapper, its forward returning the last position's logits only."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class LastLogits(TorchExportableModuleWithStaticCache):
        def forward(self, input_ids, cache_position):  # type: ignore[override]
            # as the library's forward: each layer's fill level set from the first position, so that one
            # program serves many generations (the cache is not reset between them)
            layers: list[Any] = list(self.static_cache.layers)  # StaticLayer here (the wrapper replaced the rest)
            for layer in layers:
                layer.cumulative_length.copy_(cache_position[0])
            out = self.model(
                input_ids=input_ids, attention_mask=None, cache=self.static_cache, use_cache=True, logits_to_keep=1
            )
            return out.logits

    return LastLogits(model, batch_size=1, max_cache_len=context)


def linear_hessians(model, calibration_ids: Sequence[int], window: int = 512) -> dict[str, np.ndarray]:
    """H = 2·XᵀX/n [K, K] of each linear layer's input X over `calibration_ids` (run in windows of
    `window` tokens through the float `model`), keyed by the layer's module name: GPTQ's statistics."""
    import torch

    sums: dict[str, Any] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def accumulate(mod, inputs, output, name: str = name) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x

            hooks.append(module.register_forward_hook(accumulate))
    ids = list(calibration_ids)
    try:
        with torch.no_grad():
            for start in range(0, len(ids), window):
                model(input_ids=torch.tensor([ids[start : start + window]]))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (2 * total / max(len(ids), 1)).numpy() for name, total in sums.items()}


def quantize_8da4w(
    model, group_size: int, hessians: dict[str, np.ndarray] | None = None, *, block_offsets: bool = False
) -> None:
    """Quantize the transformers causal LM `model` in place as the 8da4w program holds it (torchao tensors,
    run eagerly as they are, which is how the lowering's fidelity is checked): every linear layer int4 weights
    in groups of `group_size` with int8 activations quantized per run, the embedding int8 per row. With
    `hessians` (linear_hessians of the float model), each 4-bit layer that has one is rounded by GPTQ on the
    grid XNNPACK runs (symmetric, scale >= 0) instead of to nearest on HQQ scales.

    `block_offsets`: each block of every 4-bit layer on its own min..max grid, w = (q - z)·s with a real zero
    point z, which XNNPACK's 4-bit kernels cannot take (they drop zero points, check_xnnpack_int4). Written as
    w = (q - 8)·s + (8 - z)·s: symmetric codes q - 8 with scale s (XNNPACK's grid, exact), plus an offset per
    block added through the block sums of the input, y += blocksum(x) @ offsetsᵀ (an fp32 linear 1/group the
    layer's size). Why: SmolLM2's weights are a dequantized Q4_1 GGUF, asymmetric 4-bit blocks of 32 that
    this reproduces exactly and no symmetric grid can; eager perplexity +10 % against +52 % (RESULTS.md)."""
    import torch
    from executorch.extension.llm.export.quantize import quantize_model_

    with torch.no_grad():
        output = model.get_output_embeddings()
        if output is not None and output.weight is model.get_input_embeddings().weight:
            # tied (SmolLM2): untied first, so that the lm head is quantized as a linear (8da4w,
            # XNNPACK) and the embedding as one (int8 rows); quantized together, the lm head got
            # the embedding's weight-only int8, which XNNPACK does not take and ExecuTorch cannot run
            output.weight = torch.nn.Parameter(output.weight.detach().clone())
        # a padding index (SmolLM2: the pad token) only masks gradients, but it keeps the int8
        # embedding from matching ExecuTorch's quantized-embedding pattern (left unlowerable)
        model.get_input_embeddings().padding_idx = None
        # layers whose input size is not a multiple of the group stay float (skip, not fail)
        floats = {
            name: module.weight.detach().numpy().copy()
            for name, module in model.named_modules()
            if (block_offsets or (hessians is not None and name in hessians)) and isinstance(module, torch.nn.Linear)
        }
        quantize_model_(
            model,
            qlinear_config="8da4w",
            qlinear_group_size=group_size,
            qembedding_config="8w",
            skip_incompatible_shapes=True,
        )
        if block_offsets:
            _offset_int4(model, floats, hessians, group_size)
        elif hessians is not None:
            _gptq_round_int4(model, floats, hessians, group_size)


def _block_offset_linear(base, offsets: np.ndarray, group_size: int):
    """`base` (a 4-bit torchao linear) plus offsets [N, K/group] applied to the input's block sums."""
    import torch

    class BlockOffsetLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.offsets = torch.nn.Parameter(torch.from_numpy(offsets), requires_grad=False)

        def forward(self, x):
            sums = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size).sum(-1)
            return self.base(x) + torch.nn.functional.linear(sums, self.offsets)

    return BlockOffsetLinear()


def _offset_int4(model, floats: dict[str, np.ndarray], hessians: dict[str, np.ndarray] | None, group_size: int) -> None:
    """Each 4-bit torchao linear of `model` (float weight in `floats`) on min..max grids with real zero points
    (GPTQ-rounded where `hessians` has the layer), as symmetric codes plus block offsets (quantize_8da4w)."""
    import torch

    from dlopt.optimize.int4 import gptq_blocks
    from dlopt.optimize.int4.blocks import quantize_blocks_float

    for name, module in list(model.named_modules()):
        weight: Any = getattr(module, "weight", None)
        if name not in floats or not _is_int4(weight):
            continue
        if hessians is not None and name in hessians:
            w = np.ascontiguousarray(floats[name].T)
            codes, scales, zeros = gptq_blocks(w, hessians[name], group_size, False, float_zero_points=True)
        else:
            codes, scales, zeros = quantize_blocks_float(floats[name], group_size)
        weight.qdata.copy_(torch.from_numpy(codes.astype(np.int8) - 8))
        weight.scale.copy_(torch.from_numpy(np.where(scales > 0, scales, 1.0).astype(np.float32)))
        offsets = (scales * (8 - zeros)).astype(np.float32)
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model, child, _block_offset_linear(module, offsets, group_size)
        )


def _is_int4(weight: Any) -> bool:
    """A torchao tensor holding 4-bit codes (torch.int4 is not in torch's type stubs)."""
    return str(getattr(weight, "target_dtype", None)) == "torch.int4"


def _gptq_round_int4(model, floats: dict[str, np.ndarray], hessians: dict[str, np.ndarray], group_size: int) -> None:
    """Replace the codes and scales of each 4-bit torchao weight whose float weight and Hessian are given by
    GPTQ's (dlopt.optimize.int4.gptq_blocks, positive scales: XNNPACK refuses negative ones). Written into the
    torchao tensors directly: re-quantizing GPTQ's dequantized weights would re-derive other scales."""
    import torch

    from dlopt.optimize.int4 import gptq_blocks

    for name, module in model.named_modules():
        weight: Any = getattr(module, "weight", None)
        if name not in floats or not _is_int4(weight):
            continue
        codes, scales, _ = gptq_blocks(
            np.ascontiguousarray(floats[name].T), hessians[name], group_size, True, positive_scale=True
        )
        weight.qdata.copy_(torch.from_numpy(codes.astype(np.int8) - 8))  # codes 0..15 around 8 -> -8..7
        # an all-zero block has scale 0 (its codes all 0): any positive scale gives the same weights
        weight.scale.copy_(torch.from_numpy(np.where(scales > 0, scales, 1.0).astype(np.float32)))


def check_xnnpack_int4(model) -> None:
    """StageError unless every 4-bit torchao weight of `model` is on a grid XNNPACK computes as PyTorch does:
    zero points all 0 and scales >= 0. XNNPACK's 4-bit kernels take symmetric weights only; asymmetric ones
    (torchao MappingType.ASYMMETRIC) were lowered and ran, but without their zero points (the tiny test Llama's
    program 9.8 dB from its own eager model, against 47-57 dB symmetric), and a negative scale fails at load."""

    for name, module in model.named_modules():
        weight: Any = getattr(module, "weight", None)
        if not _is_int4(weight) or not hasattr(weight, "zero_point"):
            continue
        if bool((weight.zero_point != 0).any()):
            raise StageError(
                f"{name}: int4 weights with zero points, which XNNPACK's 4-bit kernels drop (wrong logits)",
                "quantize the weights symmetrically (zero point 0)",
            )
        if bool((weight.scale < 0).any()):
            raise StageError(f"{name}: int4 weights with negative scales, which XNNPACK refuses", "keep scales >= 0")


def lower_lm_to_pte(
    hf_folder: str | os.PathLike,
    config: PteLmConfig = PteLmConfig(),
    *,
    calibration_ids: Sequence[int] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[bytes, dict[str, Any]]:
    """The ExecuTorch program (bytes) of the causal LM in `hf_folder`, XNNPACK-delegated, and a record
    of how it was made (precision, group size, context, delegated and portable op counts). With
    `calibration_ids` (token ids, not the held-out text), 8da4w's int4 weights are rounded by GPTQ."""
    check_config(config)
    require_executorch()
    from dlopt.optimize.export_lm import check_hf_folder

    folder = Path(hf_folder)
    hf_config = check_hf_folder(folder)
    import torch
    import transformers

    context = min(config.context, int(hf_config.get("max_position_embeddings") or config.context))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with quiet_libraries():
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
            if config.precision == "8da4w":
                log(f"quantizing the linear layers 8da4w (int4 weights, groups of {config.group_size}), embedding int8")
                hessians = None
                if calibration_ids:
                    log(f"collecting the linear layers' Hessians on {len(calibration_ids)} calibration tokens (GPTQ)")
                    hessians = linear_hessians(model, calibration_ids)
                quantize_8da4w(model, config.group_size, hessians, block_offsets=config.block_offsets)
                check_xnnpack_int4(model)
            model.generation_config.use_cache = True
            model.generation_config.cache_implementation = "static"
            module = _last_logits_module(model, context)
            seq = torch.export.Dim("seq", min=1, max=context)
            example = torch.arange(2, dtype=torch.long)
            log(f"exporting with a static KV cache of {context} tokens and lowering to XNNPACK ({config.precision})")
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
            from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

            with torch.no_grad():
                # strict (dynamo) export: the non-strict one lifts the cache tensors as constants and loses
                # their in-place updates (torch 2.13, transformers 5.25)
                exported = torch.export.export(
                    module,
                    args=(),
                    kwargs={"input_ids": example[None], "cache_position": example},
                    dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}},
                    strict=True,
                )
                edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
                ops = [str(n.target) for n in edge.exported_program().graph.nodes if n.op == "call_function"]
                # quant fusion turns the int8 embedding's dequantize + embedding into ExecuTorch's
                # quantized_decomposed::embedding_byte (XNNPACK takes no embedding); the constraint-based
                # shape pass plans memory for the dynamic sequence length's bound
                program = edge.to_executorch(
                    ExecutorchBackendConfig(
                        extract_delegate_segments=True,
                        do_quant_fusion_and_const_prop=True,
                        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                    )
                )
    except (InputError, StageError):
        raise
    except Exception as e:  # transformers, torch.export and ExecuTorch raise many types
        raise StageError(
            f"lowering {folder} to ExecuTorch ({config.precision}) failed: {type(e).__name__}: {str(e)[:400]}",
            "rerun with --debug, or report this model",
        ) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    delegated = sum("executorch_call_delegate" in op for op in ops)
    record = {
        "precision": config.precision,
        "group_size": config.group_size if config.precision == "8da4w" else None,
        "embedding": "int8 per row" if config.precision == "8da4w" else "fp32",
        "int4_grid": None
        if config.precision != "8da4w"
        else "min..max per block (real zero points as block offsets)"
        if config.block_offsets
        else "symmetric",
        "int4_rounding": None
        if config.precision != "8da4w"
        else f"gptq ({len(calibration_ids)} calibration tokens)"
        if calibration_ids
        else "nearest (hqq scales)",
        "context_length": context,
        "input_names": list(INPUT_NAMES),
        "xnnpack_delegates": delegated,
        "portable_ops": sorted({op for op in ops if "executorch_call_delegate" not in op and "getitem" not in op}),
        "exporter": "transformers TorchExportableModuleWithStaticCache, torch.export, "
        "executorch to_edge_transform_and_lower (XnnpackPartitioner)",
    }
    return bytes(program.buffer), record


class PteLm:
    """A loaded LM program: `logits(ids, start)` runs ids at cache positions start.. and returns the last
    position's logits; `greedy` and `check_greedy` as dlopt.genai's, on this program. The thread pool is
    sized at load (dlopt.targets.xnnpack.set_threads: programs loaded before a resize must not run)."""

    def __init__(self, source: str | os.PathLike | bytes, *, threads: int = 1):
        require_executorch()
        set_threads(threads)
        with quiet_libraries():
            import executorch.kernels.quantized  # noqa: F401 - registers the int8 embedding's kernel (embedding_byte)
            from executorch.runtime import Runtime

            runtime = Runtime.get()
        label = "the program" if isinstance(source, bytes) else str(source)
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            self._program = runtime.load_program(data)
            self._method = self._program.load_method("forward")
        except Exception as e:  # the runtime's own error types
            raise InputError(f"ExecuTorch cannot load {label}: {str(e)[:300]}", "package it again") from e
        meta = self._method.metadata
        if meta.num_inputs() != len(INPUT_NAMES):
            raise InputError(
                f"{label} takes {meta.num_inputs()} inputs, not an LM program's {list(INPUT_NAMES)}",
                "give a .pte that dlopt lowered from a causal LM",
            )
        self.context_length = int(meta.input_tensor_meta(0).sizes()[1])

    def logits(self, ids: Sequence[int], start: int) -> np.ndarray:
        import torch

        if start + len(ids) > self.context_length:
            raise InputError(
                f"{start + len(ids)} tokens exceed the program's static cache of {self.context_length}",
                "shorten the prompt or the new tokens, or lower the LM again with a longer context",
            )
        out = self._method.execute(
            [torch.tensor([list(ids)], dtype=torch.long), torch.arange(start, start + len(ids), dtype=torch.long)]
        )[0]
        return np.array(out[0, -1].numpy(), dtype=np.float32, copy=True)  # planned memory: the next run overwrites it

    def greedy(self, prompt_ids: Sequence[int], new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of `prompt_ids`, up to `new_tokens` tokens; it stops after a `stop_ids` token."""
        tokens: list[int] = []
        logits = self.logits(prompt_ids, 0)
        position = len(prompt_ids)
        while True:
            tokens.append(int(logits.argmax()))
            if len(tokens) == new_tokens or tokens[-1] in stop_ids:
                return tokens
            logits = self.logits(tokens[-1:], position)
            position += 1

    def time_generation(
        self, prompt_len: int, new_tokens: int, *, budget_s: float, vocab_size: int, seed: int = 0
    ) -> dict[str, Any]:
        """Prefill ms and decode tokens/s of a greedy generation of `new_tokens` after a seeded random
        `prompt_len`-token prompt: medians over rounds (one warm-up, then until `budget_s`, 2 to 10). The
        clock is the calling thread's CPU time on one thread (XNNPACK then runs on it), wall time otherwise."""
        import time

        from executorch.extension.pybindings import portable_lib

        one_thread = portable_lib._threadpool_get_thread_count() == 1
        clock = time.thread_time if one_thread else time.perf_counter
        prompt = np.random.default_rng(seed).integers(0, vocab_size, prompt_len).tolist()
        prefill, decode = [], []
        started = time.perf_counter()
        for round_ in range(11):
            t0 = clock()
            logits = self.logits(prompt, 0)
            t1 = clock()
            for k in range(new_tokens - 1):
                logits = self.logits([int(logits.argmax())], prompt_len + k)
            t2 = clock()
            if round_ > 0:  # the first run allocates and packs: a warm-up
                prefill.append(t1 - t0)
                decode.append((t2 - t1) / max(new_tokens - 1, 1))
            if round_ >= 2 and time.perf_counter() - started > budget_s:
                break
        return {
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "rounds": len(prefill),
            "clock": "thread CPU time" if one_thread else "wall time",
            "prefill_ms": float(np.median(prefill)) * 1e3,
            "decode_tokens_per_s": 1.0 / float(np.median(decode)),
        }

    def check_greedy(self, prompt_ids: Sequence[int], recorded: Sequence[int], *, tie_rtol: float) -> dict[str, Any]:
        """dlopt.genai.judge_recorded_tokens on this program: the prompt, then each recorded token fed in turn."""
        from dlopt.genai import judge_recorded_tokens

        position = 0

        def next_logits(feed: Sequence[int]) -> np.ndarray:
            nonlocal position
            logits = self.logits(feed, position)
            position += len(feed)
            return logits

        return judge_recorded_tokens(next_logits, prompt_ids, recorded, tie_rtol=tie_rtol, subject="program")


__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_GROUP_SIZE",
    "PRECISIONS",
    "PteLm",
    "PteLmConfig",
    "check_xnnpack_int4",
    "linear_hessians",
    "lower_lm_to_pte",
    "quantize_8da4w",
]
