"""Structured pruning that makes models faster, and unstructured pruning reported for what it is.

Structured pruning removes whole channels, attention heads or FFN units, so the tensors (and the ONNX
model) really shrink; it is built on Torch-Pruning's dependency graph, which finds every layer whose
shape must change with a removed channel. Unstructured pruning (torch.nn.utils.prune) only writes
zeros: the model keeps its shapes, size and speed, and compresses better. Its report says so and
makes no speed claim.

Never pruned: the layer that produces the model's output (the classifier: pruning it would remove
classes) and the layers named in `ignore` (their output channels are kept; their inputs may shrink
with the layer that feeds them).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import gzip
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from dlopt.checkpoint import require_torch_pruning
from dlopt.errors import InputError, StageError
from dlopt.optimize.export import TORCH_SOURCE
from dlopt.sources import ModelSource
from dlopt.stage import (
    Artifact,
    StageContext,
    StageInput,
    StageResult,
    TorchStageArtifacts,
    config_to_dict,
    get_stage,
    register_stage,
)

Structure = Literal["auto", "channels", "heads", "ffn", "heads+ffn", "unstructured"]
STRUCTURES: tuple[str, ...] = ("auto", "channels", "heads", "ffn", "heads+ffn", "unstructured")
Importance = Literal["magnitude", "taylor", "lamp", "random"]
IMPORTANCES: tuple[str, ...] = ("magnitude", "taylor", "lamp", "random")

# Attributes that hold an attention module's head count, and the names of its q/k/v projections.
_HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"), ("to_q", "to_k", "to_v"))
_HEAD_WIDTH_ATTRS = ("all_head_size", "inner_dim")  # attention widths that shrink with the heads


@dataclass(frozen=True, kw_only=True)
class Prune:
    """Structured (channels, heads, FFN units) or unstructured pruning of a torch module."""

    VERSION: ClassVar[int] = 1
    ratio: float = 0.5  # fraction of channels / heads / FFN units (or of weights, unstructured) removed
    structure: Structure = "auto"  # auto: heads+ffn for transformers, channels otherwise
    importance: Importance = "magnitude"  # how channels are ranked (taylor needs gradient batches)
    global_pruning: bool = False  # rank across layers (uneven widths) instead of the same ratio per layer
    ignore: tuple[str, ...] = ()  # module names whose output channels are kept
    round_to: int | None = None  # keep channel counts multiples of this (e.g. 8 for SIMD-friendly widths)


def check_config(config: Prune) -> None:
    if config.structure not in STRUCTURES:
        raise InputError(f"unknown pruning structure {config.structure!r}", f"choose one of {', '.join(STRUCTURES)}")
    if config.importance not in IMPORTANCES:
        raise InputError(f"unknown importance {config.importance!r}", f"choose one of {', '.join(IMPORTANCES)}")
    if not isinstance(config.ratio, (int, float)) or not 0.0 < config.ratio < 1.0:
        raise InputError(
            f"pruning ratio {config.ratio!r} is out of range",
            "give a fraction strictly between 0 and 1, e.g. {ratio=0.5}",
        )
    if config.round_to is not None and config.round_to < 1:
        raise InputError(f"round_to {config.round_to} must be a positive channel count", "e.g. {round_to=8}")


# ---------------------------------------------------------------------------------------------
# Finding the layers: output layer, attention modules, FFN
# ---------------------------------------------------------------------------------------------


def first_tensor(out: Any):
    """The tensor a model outputs first: tensors, tuples/lists, dicts and HF ModelOutputs."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    raise InputError(
        f"the model returned {type(out).__name__}, not a tensor",
        "its forward() must return a tensor, a tuple of tensors or a ModelOutput",
    )


def output_layer_name(module, example_inputs: Mapping[str, Any]) -> str | None:
    """The last Linear/Conv layer to run: the classifier (or the layer whose width is the output's).

    Found by running the model once with forward hooks rather than by name, so it works for any model."""
    import torch

    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: order.append(name))
        for name, m in module.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
    ]
    try:
        with torch.no_grad():
            module(**example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


@dataclass(frozen=True)
class AttentionModule:
    name: str
    module: Any
    qkv: tuple[Any, Any, Any]
    head_attr: str

    @property
    def heads(self) -> int:
        return int(getattr(self.module, self.head_attr))


def find_attention(module) -> list[AttentionModule]:
    """Attention modules with separate q/k/v Linear layers and a head-count attribute.

    nn.MultiheadAttention packs q/k/v into one parameter: its heads cannot be removed this way."""
    import torch

    found = []
    for name, m in module.named_modules():
        head_attr = next((a for a in _HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int)), None)
        if head_attr is None:
            continue
        for names in _QKV_NAMES:
            q, k, v = (getattr(m, n, None) for n in names)
            if all(isinstance(layer, torch.nn.Linear) for layer in (q, k, v)):
                found.append(AttentionModule(name, m, (q, k, v), head_attr))
                break
    return found


def _real_layer(m) -> bool:
    """A module of the user's model, not one of Torch-Pruning's stand-ins for functional ops."""
    return not type(m).__module__.startswith("torch_pruning")


def find_ffn(module, graph, skip: set) -> list[tuple[str, Any, Any]]:
    """(name, up, down) Linear pairs of feed-forward blocks: up's outputs feed only down's inputs
    (through element-wise ops such as the activation) and down maps back to up's input width."""
    import torch
    import torch_pruning as tp

    pairs = []
    for name, up in module.named_modules():
        if not isinstance(up, torch.nn.Linear) or up in skip or up not in graph.module2node:
            continue  # (layers inside nn.MultiheadAttention are pruned with it, not on their own)
        group = graph.get_pruning_group(up, tp.prune_linear_out_channels, idxs=[0])
        layers = [
            (dep.target.module, graph.is_out_channel_pruning_fn(dep.handler))
            for dep, _ in group
            if _real_layer(dep.target.module)
        ]
        outs = [m for m, is_out in layers if is_out]
        ins = [m for m, is_out in layers if not is_out]
        if (
            outs == [up]
            and len(ins) == 1
            and isinstance(ins[0], torch.nn.Linear)
            and ins[0].out_features == up.in_features
            and ins[0] is not up
        ):
            pairs.append((name, up, ins[0]))
    return pairs


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


def count_macs_params(module, example_inputs: Mapping[str, Any]) -> tuple[int, int]:
    import contextlib

    _, tp = require_torch_pruning()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning for keyword-only inputs
        macs, params = tp.utils.count_ops_and_params(module, dict(example_inputs))
    return int(macs), int(params)


def _layer_shapes(module) -> dict[str, list[int]]:
    return {
        n: list(m.weight.shape)
        for n, m in module.named_modules()
        if _real_layer(m) and getattr(m, "weight", None) is not None and hasattr(m.weight, "shape")
    }


def _importance(config: Prune):
    _, tp = require_torch_pruning()
    if config.importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if config.importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    if config.importance == "lamp":
        return tp.importance.LAMPImportance(p=2)
    return tp.importance.RandomImportance()


def _resolve_ignored(module, names: Iterable[str]) -> list[Any]:
    modules = dict(module.named_modules())
    resolved = []
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else "names are module paths as in model.named_modules(), e.g. features.3 or classifier"
            )
            raise InputError(f"layers to ignore: the model has no layer named {name!r}", hint)
        resolved.append(modules[name])
    return resolved


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

GradientBatches = Iterable[tuple[Mapping[str, Any], Any]]


def prune(
    module,
    example_inputs: Mapping[str, Any],
    config: Prune = Prune(),
    *,
    gradient_batches: GradientBatches | None = None,
) -> StageResult:
    """Prune a copy of `module` (the input is not modified). Returns the pruned module and a report.

    `example_inputs` are the keyword inputs of forward(), used to trace the dependency graph and count
    MACs. `gradient_batches` are (inputs, labels or None) pairs, needed by importance="taylor": the
    loss is cross-entropy with labels, else the squared output (a label-free first-order saliency)."""
    torch, tp = require_torch_pruning()
    check_config(config)
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"prune takes a torch.nn.Module, got {type(module).__name__}", "load the model first")
    inputs = dict(example_inputs)
    model = copy.deepcopy(module).eval()
    ignored = _resolve_ignored(model, config.ignore)
    output_layer = output_layer_name(model, inputs)
    with torch.no_grad():
        out_before = first_tensor(model(**inputs))
    macs_before, params_before = count_macs_params(model, inputs)
    shapes_before = _layer_shapes(model)

    if config.structure == "unstructured":
        report = _prune_unstructured(model, config, output_layer, ignored)
    else:
        report = _prune_structured(model, inputs, config, output_layer, ignored, gradient_batches)

    with torch.no_grad():
        out_after = first_tensor(model(**inputs))
    if out_after.shape != out_before.shape:  # the output layer is ignored: this would be a bug here
        raise StageError(
            f"pruning changed the output shape {list(out_before.shape)} -> {list(out_after.shape)}",
            "add the output layer to {ignore=NAMES} and report this",
        )
    macs_after, params_after = count_macs_params(model, inputs)
    shapes_after = _layer_shapes(model)
    changed = [
        {"layer": n, "before": shapes_before[n], "after": shapes_after.get(n)}
        for n in shapes_before
        if shapes_before[n] != shapes_after.get(n)
    ]
    report = {
        "stage": "prune",
        "config": config_to_dict(config),
        "output_layer": output_layer,
        "ignored": list(config.ignore),
        "parameters_before": params_before,
        "parameters_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "changed_layers": changed,
        **report,
    }
    return StageResult(model=model, report=report)


def _prune_structured(
    model, inputs, config: Prune, output_layer: str | None, ignored: list, gradient_batches: GradientBatches | None
) -> dict[str, Any]:
    torch, tp = require_torch_pruning()
    modules = dict(model.named_modules())
    ignored = list(ignored) + ([modules[output_layer]] if output_layer else [])
    attention = find_attention(model)
    structure = config.structure
    packed_attention = [n for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    if structure == "auto":
        # nn.MultiheadAttention packs q/k/v into one weight: its heads cannot be removed, only its FFN
        structure = "heads+ffn" if attention else ("ffn" if packed_attention else "channels")
    want_heads = structure in ("heads", "heads+ffn")
    want_ffn = structure in ("ffn", "heads+ffn")
    if want_heads and not attention:
        raise InputError(
            "{structure=heads}: the model has no attention module with separate q/k/v Linear layers and a head count",
            "nn.MultiheadAttention packs q/k/v into one weight; use {structure=ffn} or channels",
        )

    num_heads: dict[Any, int] = {}
    ratio_dict: dict[Any, float] = {}
    qkv_layers = {layer for a in attention for layer in a.qkv}
    if want_heads:
        for a in attention:
            removed = math.ceil(config.ratio * a.heads)
            if removed >= a.heads:
                raise InputError(
                    f"ratio {config.ratio} would remove all {a.heads} heads of {a.name}",
                    f"use a ratio below {(a.heads - 1) / a.heads:.3f}",
                )
            for layer in a.qkv:
                num_heads[layer] = a.heads
            # Torch-Pruning 1.6 removes heads only inside a width-pruning scope that prunes something;
            # head dims are kept (prune_head_dims=False), so this ratio only opens that scope.
            ratio_dict[a.qkv[0]] = config.ratio
    if want_ffn:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
        ffn = [(n, up, down) for n, up, down in find_ffn(model, graph, skip=qkv_layers | set(ignored))]
        if not ffn:
            raise InputError(
                "{structure=ffn}: found no feed-forward block (Linear -> activation -> Linear back to the input width)",
                "use {structure=channels}",
            )
        for _, up, _ in ffn:
            ratio_dict[up] = config.ratio
    default_ratio = config.ratio if structure == "channels" else 0.0

    importance = _importance(config)
    pruner = tp.pruner.BasePruner(
        model,
        inputs,
        importance=importance,
        global_pruning=config.global_pruning,
        pruning_ratio=default_ratio,
        pruning_ratio_dict=ratio_dict or None,
        ignored_layers=ignored,
        round_to=config.round_to,
        num_heads=dict(num_heads),
        prune_num_heads=want_heads,
        prune_head_dims=False,
        head_pruning_ratio=config.ratio if want_heads else 0.0,
        # fresh dicts: Torch-Pruning 1.6 mutates these default arguments, leaking state between pruners
        in_channel_groups={},
        out_channel_groups={},
        output_transform=lambda out: first_tensor(out).float().sum(),
    )
    if config.importance == "taylor":
        _accumulate_gradients(model, inputs, gradient_batches)
    heads_before = {a.name: a.heads for a in attention}
    pruner.step()
    model.zero_grad(set_to_none=True)
    # the attention modules keep their own head count: make it match the pruned q/k/v
    for a in attention:
        if a.qkv[0] in pruner.num_heads:
            setattr(a.module, a.head_attr, int(pruner.num_heads[a.qkv[0]]))
        for attr in _HEAD_WIDTH_ATTRS:
            if isinstance(getattr(a.module, attr, None), int):
                setattr(a.module, attr, int(a.qkv[0].out_features))
    heads = {a.name: {"before": heads_before[a.name], "after": a.heads} for a in attention}
    return {
        "structure": structure,
        "packed_attention_kept": packed_attention,
        "attention_heads": heads,
        "pruning_history": [list(h) for h in pruner.pruning_history()],
        "module_attributes": {
            a.name: {
                a.head_attr: a.heads,
                **{k: getattr(a.module, k) for k in _HEAD_WIDTH_ATTRS if isinstance(getattr(a.module, k, None), int)},
            }
            for a in attention
        },
        "speedup_claim": "structured: tensors shrink, latency falls; measure it with the bench harness",
    }


def _accumulate_gradients(model, inputs, gradient_batches: GradientBatches | None) -> None:
    torch, _ = require_torch_pruning()
    if gradient_batches is None:
        raise InputError(
            "importance 'taylor' needs data to compute gradients",
            "give calibration data, or use {importance=magnitude}",
        )
    model.zero_grad(set_to_none=True)
    n = 0
    for batch_inputs, labels in gradient_batches:
        out = first_tensor(model(**batch_inputs))
        loss = torch.nn.functional.cross_entropy(out, labels) if labels is not None else out.float().pow(2).mean()
        loss.backward()
        n += 1
    if n == 0:
        raise InputError("importance 'taylor' got an empty data iterator", "give at least one batch")


def _prune_unstructured(model, config: Prune, output_layer: str | None, ignored: list) -> dict[str, Any]:
    """Global magnitude pruning of Linear/Conv weights with torch.nn.utils.prune, made permanent.

    Zeros are still stored and multiplied: the report gives sparsity and compressed size, no speedup."""
    torch, _ = require_torch_pruning()
    from torch.nn.utils import prune as torch_prune

    skip = set(ignored)
    params = [
        (m, "weight")
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        and n != output_layer
        and m not in skip
    ]
    if not params:
        raise InputError("no Linear or Conv layer left to prune", "check {ignore=NAMES}")
    dense_bytes = _gzip_size(model)
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=float(config.ratio))
    for m, name in params:
        torch_prune.remove(m, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    total = sum(m.weight.numel() for m, _ in params)
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    sparse_bytes = _gzip_size(model)
    return {
        "structure": "unstructured",
        "sparsity_pruned_layers": zeros / total,
        "sparsity_all_parameters": all_zeros / all_params,
        "dense_bytes": _raw_size(model),
        "gzip_bytes_before": dense_bytes,
        "gzip_bytes_after": sparse_bytes,
        "compression_ratio": dense_bytes / sparse_bytes,
        "speedup_claim": None,
        "note": "unstructured sparsity: zeros are still stored and multiplied, so dense runtimes (ONNX Runtime, "
        "torch) run at the same speed; only the compressed (gzip) size falls",
    }


def _state_bytes(model) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def _raw_size(model) -> int:
    return len(_state_bytes(model))


def _gzip_size(model) -> int:
    return len(gzip.compress(_state_bytes(model), compresslevel=6, mtime=0))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _write(given: StageInput, config: Prune, context: StageContext) -> Artifact:
    """The source (or the stage before's checkpoint) pruned, as the checkpoint OUTPUT/model.pt."""
    from dlopt.checkpoint import save_checkpoint, torch_source

    result = prune_stage.apply(
        torch_source(given.source, given.artifact, context.log),
        config,
        StageContext(after=context.after, log=context.log),
    )
    produced = save_checkpoint(context.folder() / "model.pt", result.model.module, given.source, result.report)
    report = {k: result.report[k] for k in ("parameters_before", "parameters_after", "macs_before", "macs_after")}
    return Artifact.of(produced, report)


def _recipe_check(recipe: Any, stage: Any, where: str) -> None:
    """In a recipe (dlopt.recipe): one prune stage, on the torch source (a pruned checkpoint records one pruning)."""
    if stage.index > 1 and get_stage(recipe.stages[stage.index - 2].kind).makes == "torch":
        raise InputError(
            f"{where}: one prune stage per recipe (a pruned checkpoint records one pruning)",
            "prune once, with the ratio you want",
        )


@register_stage(
    kind="prune",
    config=Prune,
    takes="torch",
    makes="torch",
    requires=(TORCH_SOURCE,),
    ensures=(TORCH_SOURCE,),
    summary="remove channels / heads / FFN units (torch)",
    validate=check_config,
    writer=_write,
    recipe_check=_recipe_check,
)
def prune_stage(source: ModelSource, config: Prune, context: StageContext) -> StageResult:
    """A ModelSource in, the same source with the pruned module out; context.data: gradient batches
    for importance "taylor"."""
    result = prune(source.module, source.example_inputs, config, gradient_batches=context.data)
    return StageResult(dataclasses.replace(source, module=result.model), result.report)


def gradient_batches(spec: str, source, n: int = 8):
    """(inputs, None) batches for taylor importance: the reference model's calibration data, else the example."""
    import numpy as np
    import torch

    from dlopt.models import REFERENCE_MODELS

    if spec in REFERENCE_MODELS:
        samples = list(REFERENCE_MODELS[spec].calibration_data(n))
        names = samples[0].keys()
        stacked = {k: torch.from_numpy(np.concatenate([s[k] for s in samples])) for k in names}
        return [(stacked, None)]
    return [(dict(source.example_inputs), None)]


def prune_files(
    spec: str,
    output_dir: str | os.PathLike,
    config: Prune,
    *,
    bench_seconds: float | None = 15.0,
    batch: int = 1,
    seq_len: int = 128,
    log: Callable[[str], None] = lambda message: None,
) -> TorchStageArtifacts:
    """Load SOURCE `spec`, prune it and write OUT/pruned.pt + a verified OUT/pruned.onnx + OUT/prune.json
    (structured: also OUT/dense.onnx and, with `bench_seconds`, the latency ratio; unstructured: the gzip
    sizes and OUT/pruned.onnx.gz), renamed into place together at the end: a failed or interrupted run
    leaves the folder as it was (and removes it when it made it). What `dlopt prune` writes."""
    from dlopt.bench import measure_speedup
    from dlopt.checkpoint import save_checkpoint
    from dlopt.fileio import guard_outputs, guard_source_spec, json_text, output_folder, stage_onnx, staged_outputs
    from dlopt.optimize.export import export_verified
    from dlopt.sources import load_source
    from dlopt.tables import format_table

    out_dir = Path(output_dir)
    guard_outputs([guard_source_spec(spec)], [out_dir])
    with output_folder(out_dir) as out_dir, staged_outputs() as outputs:
        log(f"loading {spec}")
        source = load_source(spec)
        gradients = gradient_batches(spec, source) if config.importance == "taylor" else None
        log(f"pruning ({config.structure}, ratio {config.ratio}, {config.importance} importance)")
        result = prune_stage.apply(source, config, StageContext(data=gradients, log=log))
        pruned = result.model.module
        report = dict(result.report)
        log("exporting the pruned model (verified against torch)")
        onnx_path = out_dir / "pruned.onnx"
        onnx_tmp = stage_onnx(
            export_verified(dataclasses.replace(result.model, name=f"{source.name} (pruned)"), log), onnx_path, outputs
        )
        checkpoint = save_checkpoint(out_dir / "pruned.pt", pruned, spec, report, outputs=outputs)
        r = report
        rows = [
            [
                "parameters",
                r["parameters_before"],
                r["parameters_after"],
                f"{r['parameters_after'] / r['parameters_before']:.3f}x",
            ],
            ["MACs (Linear/Conv)", r["macs_before"], r["macs_after"], f"{r['macs_after'] / r['macs_before']:.3f}x"],
        ]
        dense_path = dense_tmp = None
        if bench_seconds is not None or config.structure == "unstructured":  # else no comparison needs it
            dense_path = out_dir / "dense.onnx"
            log("exporting the unpruned model for comparison")
            dense_tmp = stage_onnx(export_verified(source, log), dense_path, outputs)
            rows.append(
                [
                    "ONNX MB",
                    dense_tmp.stat().st_size / 1e6,
                    onnx_tmp.stat().st_size / 1e6,
                    f"{onnx_tmp.stat().st_size / dense_tmp.stat().st_size:.3f}x",
                ]
            )
        notes: list[str] = []
        if config.structure == "unstructured" and dense_tmp is not None:  # (exported above for it)
            dense_gz = len(gzip.compress(dense_tmp.read_bytes(), compresslevel=6, mtime=0))
            sparse_gz_bytes = gzip.compress(onnx_tmp.read_bytes(), compresslevel=6, mtime=0)
            outputs.stage(out_dir / "pruned.onnx.gz").write_bytes(sparse_gz_bytes)
            report["onnx_gzip_bytes_before"], report["onnx_gzip_bytes_after"] = dense_gz, len(sparse_gz_bytes)
            rows += [
                ["sparsity (pruned layers)", 0.0, r["sparsity_pruned_layers"], ""],
                ["ONNX gzip MB", dense_gz / 1e6, len(sparse_gz_bytes) / 1e6, f"{len(sparse_gz_bytes) / dense_gz:.3f}x"],
            ]
            notes.append(
                "no speedup: unstructured pruning keeps every tensor's shape; the zeros are stored and "
                "multiplied, so it runs at the dense model's speed. It only compresses better "
                "(pruned.onnx.gz)."
            )
        else:
            heads = r.get("attention_heads") or {}
            if heads:
                before = sum(h["before"] for h in heads.values())
                after = sum(h["after"] for h in heads.values())
                rows.append(["attention heads", before, after, f"{after / before:.3f}x"])
            if bench_seconds is not None and dense_tmp is not None:  # (exported above for it)
                log(f"measuring latency, one thread, interleaved ({bench_seconds:g} s)")
                speed = measure_speedup(dense_tmp, onnx_tmp, budget_s=bench_seconds, batch=batch, seq_len=seq_len)
                report["latency"] = speed
                rows.append(
                    [
                        f"latency (1 thread) ms, batch {speed['batch']}",
                        speed["baseline_ms"],
                        speed["ms"],
                        f"{speed['speedup']:.2f}x faster [{speed['speedup_low']:.2f}, {speed['speedup_high']:.2f}]",
                    ]
                )
            notes.append(
                f"accuracy is not restored yet: fine-tune with `dlopt distill --teacher {spec} --student {checkpoint}`"
            )
        report |= {
            "source": spec,
            "checkpoint": str(checkpoint),
            "onnx": str(onnx_path),
            "dense_onnx": str(dense_path) if dense_path else None,
        }
        report_path = out_dir / "prune.json"
        outputs.stage(report_path).write_text(json_text(report))
        table = format_table(["", "before", "after", "change"], rows)
        return TorchStageArtifacts(checkpoint, onnx_path, report_path, report, table, tuple(notes))


__all__ = [
    "Prune",
    "IMPORTANCES",
    "STRUCTURES",
    "AttentionModule",
    "check_config",
    "count_macs_params",
    "first_tensor",
    "find_attention",
    "find_ffn",
    "output_layer_name",
    "prune",
    "gradient_batches",
    "prune_files",
    "prune_stage",
]
