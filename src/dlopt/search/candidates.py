"""The candidates `dlopt optimize` searches: each one a recipe, an ordered list of stage descriptions
(a kind and a config dict, exactly a recipe's [[stage]] table), applied after the source's export.

The space is small (about ten candidates for a model and target) and every member is worth knowing,
so it is enumerated in a fixed order of promise, not sampled: a sampler such as Optuna pays off when
the space is too large to try, and here a sampler's trials would be the same list in a random order.
What does not fit the time budget is reported as skipped, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dlopt.optimize.quantize.schemes import METHODS


@dataclass(frozen=True)
class StageDesc:
    kind: str  # a recipe stage kind (dlopt.recipe.STAGE_KINDS)
    config: Mapping[str, Any] = field(default_factory=dict)  # the stage's config keys, as in a recipe

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dict(self.config)}


@dataclass(frozen=True)
class Candidate:
    name: str
    precision: str  # fp32 | int8 | int4 | fp16
    stages: tuple[StageDesc, ...]  # after the export of a torch source; () is the source itself
    why: str  # what this candidate tries

    def recipe(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.stages]

    # Whether applying it times kernels on this host: quantize's node-form choice (static or auto-mode
    # INT8) or, for a transformer, its LayerNorm-form choice left to `auto`. Such a candidate runs alone on
    # a node of the target's class (executor.measure): timed beside other transforms, or on another class
    # of node, the choice follows the load, and the graph with it (seen: 4 different static INT8 graphs of
    # one CNN in 4 cold runs with 2 parallel workers).
    times_kernels: bool = False


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str
    recipe: tuple[Mapping[str, Any], ...] = ()


def _quantize(target: str, **keys: Any) -> StageDesc:
    # speed_check off: the search times every candidate that can reach the front in the bench harness
    return StageDesc("quantize", {"target": target, "speed_check": False, **keys})


def _times_kernels(stages: tuple[StageDesc, ...], transformer: bool) -> bool:
    for s in stages:
        if s.kind != "quantize" or s.config.get("precision", "int8") != "int8":
            continue
        mode = s.config.get("mode", "auto")
        if mode in ("auto", "static") and "node_forms" not in s.config:
            return True
        if transformer and mode in ("auto", "dynamic") and "layernorm_form" not in s.config:
            return True
    return False


def base_candidates(*, target: str, transformer: bool, untrimmed: bool = False) -> list[Candidate]:
    """FP32, the recipe `dlopt quantize --mode auto` picks (what the hand-written recipes use), INT8
    dynamic and static with each calibration method, the kernel choices (node forms, LayerNorm form),
    INT4 weight-only and FP16; the most promising first (they run first under a time budget).
    `untrimmed`: quantize's own padding removal off (where the search tries it as candidates of their own,
    `trimmed`, the untrimmed forms are what they are compared with)."""
    trim = {"trim_padding": "off"} if untrimmed else {}
    q = lambda **keys: _quantize(target, **trim, **keys)  # noqa: E731 (a local shorthand)
    methods = METHODS  # the calibration methods quantize offers
    found = [
        Candidate("fp32", "fp32", (), "the source itself: the reference every ratio is against"),
        Candidate(
            "int8-auto",
            "int8",
            (q(precision="int8", mode="auto"),),
            "the INT8 recipe dlopt quantize chooses for this model, target and CPU",
        ),
    ]
    if transformer:
        found += [
            Candidate(
                "int8-dynamic-ln-fused",
                "int8",
                (q(precision="int8", mode="dynamic", layernorm_form="fused"),),
                "dynamic INT8, residual sums fused into SkipLayerNormalization",
            ),
            Candidate(
                "int8-dynamic-ln-unfused",
                "int8",
                (q(precision="int8", mode="dynamic", layernorm_form="unfused"),),
                "dynamic INT8, residual sums kept out of LayerNorm (kernel choice)",
            ),
        ]
        found += [
            Candidate(
                f"int8-static-{m}",
                "int8",
                (q(precision="int8", mode="static", method=m),),
                f"static INT8 (QDQ), {m} calibration",
            )
            for m in methods
        ]
    else:
        found += [
            Candidate(
                f"int8-static-{m}",
                "int8",
                (q(precision="int8", mode="static", method=m),),
                f"static INT8 (QDQ), {m} calibration, node forms timed here",
            )
            for m in methods
        ]
        found += [
            Candidate(
                "int8-static-minmax-allint8",
                "int8",
                (q(precision="int8", mode="static", method="minmax", node_forms="int8"),),
                "static INT8, every node class in INT8 (kernel choice: no float node forms)",
            ),
            Candidate(
                "int8-dynamic",
                "int8",
                (q(precision="int8", mode="dynamic"),),
                "dynamic INT8 (activations quantized at run time)",
            ),
        ]
    found += [
        Candidate("int4", "int4", (q(precision="int4"),), "4-bit weight-only (MatMulNBits) for MatMul/Gemm"),
        Candidate("fp16", "fp16", (q(precision="fp16"),), "FP16 weights and compute, FP32 fallback where it overflows"),
    ]
    return [dataclasses.replace(c, times_kernels=_times_kernels(c.stages, transformer)) for c in found]


def with_exclusions(candidate: Candidate, *, max_drop_metric: float, evaluator: str) -> Candidate:
    """`candidate` with quantize's accuracy budget: the nodes that add the most noise stay float until
    the evaluator's drop is within `max_drop_metric` (dlopt.optimize.accuracy_budget)."""
    # leave_one_out_limit 0: nodes ranked by the noise each adds (two runs of the model), not by one
    # re-quantization per node; with a reference evaluator the latter took EfficientNet-Lite0's retry past
    # the whole search's 20-minute budget on the shared 2-core machine
    keys = {"max_accuracy_drop": max_drop_metric, "evaluator": evaluator, "leave_one_out_limit": 0}
    stages = tuple(StageDesc(s.kind, {**s.config, **keys}) if s.kind == "quantize" else s for s in candidate.stages)
    return Candidate(
        f"{candidate.name}+float-nodes",
        candidate.precision,
        stages,
        f"{candidate.why}; the most sensitive nodes kept in float to meet the budget",
        candidate.times_kernels,
    )


TRIM_SUFFIX = "+trim"


def removal_text(form: str | None, inputs: Sequence[str]) -> str:
    """What padding removal does to `inputs`, in the form the trim-padding stage reported (`form`: pack or
    slice; None where a report predates the key)."""
    names = ", ".join(inputs)
    if form == "pack":
        return f"packs {names} to the real tokens of all rows, computed as one sequence"
    if form == "slice":
        return f"slices {names} to each batch's longest real length"
    return f"removes the padding of {names}"


def trimmed(candidate: Candidate, equivalence: str, form: str | None = None) -> Candidate:
    """`candidate` with padding removal appended (the trim-padding stage, dlopt.optimize.trim_padding): its
    token inputs packed to the real tokens, else sliced to each batch's longest real length (`form`: what
    the FP32 check applied; the stage reports its own). Mode `on`: the search confirmed on held-out
    inputs that the FP32 model's outputs do not depend on the padding (`equivalence` says how); whatever
    trimming changes in a quantized model's rounding (dynamic INT8 takes its ranges per call, over padding
    too) is measured like any candidate's, by the evaluator's drop, and the stage reports the trimmed vs
    untrimmed cosine on its samples. Appended as a stage of its own, not as quantize's trim_padding key,
    so that the untrimmed candidate's quantization is reused from the stage cache, not run again."""
    stage = StageDesc("trim-padding", {"mode": "on"})
    return Candidate(
        f"{candidate.name}{TRIM_SUFFIX}",
        candidate.precision,
        (*candidate.stages, stage),
        f"{candidate.why}; padding removed ({_FORM_WORDS.get(form or '', 'trim-padding')}, as on FP32; {equivalence})",
        candidate.times_kernels,
    )


_FORM_WORDS = {"pack": "packed to the real tokens", "slice": "sliced to each batch's longest real length"}


def untrimmed_name(name: str) -> str | None:
    """The candidate a trimmed one was made from; None for one that is not trimmed."""
    return name[: -len(TRIM_SUFFIX)] if name.endswith(TRIM_SUFFIX) else None


PRUNE_RATIOS = (0.25, 0.5)
# Distillation per candidate, bounded so that a ratio costs minutes, not hours, on a small CPU machine:
# two short epochs with early stopping (a longer `dlopt distill` run of the chosen ratio can recover more).
DISTILL_KEYS = {"epochs": 2, "max_batches_per_epoch": 40, "patience": 1}


def prune_candidates(source: str, *, torch_source: bool, asked: bool = True) -> tuple[list[Candidate], list[Skipped]]:
    """Structured pruning at each of PRUNE_RATIOS, then distillation from the source (recipe stages prune
    and distill, before the export). Only for torch sources with training data: a reference model's own,
    since `dlopt optimize` takes no training-data option yet. They run after the quantization candidates,
    so the time budget drops them first; and only when asked for (`search_pruning`): a ratio's training
    costs minutes, more than the rest of a 20-minute search for MiniLM on a 2-core machine."""
    if not asked:
        return [], [
            Skipped(
                "prune+distill",
                "not asked for (--prune, or search_pruning=True from Python): training a "
                "distilled student takes minutes per ratio",
            )
        ]
    if not torch_source:
        return [], [
            Skipped("prune+distill", "the source is an .onnx file: pruning and distillation need the torch model")
        ]
    from dlopt.models import REFERENCE_MODELS

    ref = REFERENCE_MODELS.get(source)
    if ref is None or not ref.training:
        return [], [
            Skipped(
                "prune+distill",
                f"{source} has no training data to distill on (reference models with "
                "some: "
                + ", ".join(m.name for m in REFERENCE_MODELS.values() if m.training)
                + "); run `dlopt prune` and `dlopt distill --data D.npz`, then optimize the result",
            )
        ]
    distill = {**DISTILL_KEYS, "loss": ref.distill_loss}
    return [
        Candidate(
            f"prune-{ratio:g}+distill",
            "fp32",
            (StageDesc("prune", {"ratio": ratio}), StageDesc("distill", distill)),
            f"structured pruning of {ratio:.0%} of the prunable channels/heads, then {distill['epochs']} "
            f"short epochs of distillation ({ref.distill_loss}) from the source on its training data",
        )
        for ratio in PRUNE_RATIOS
    ], []


# -- exported LM folders (`dlopt optimize LM_FOLDER`): the int4-lm stage's schemes --------------------------

LM_SCHEMES = ("rtn", "gptq")  # dlopt.optimize.quantize_lm's algorithms (GPTQ needs calibration text)
LM_BLOCK_SIZES = (32, 64, 128)  # weights per scale along K: larger blocks are smaller and no slower
LM_MIX_HEADROOM = 0.10  # a mixed 4/8-bit candidate may be this much larger than its all-4-bit form
LM_MIX_TRIES = 2  # mixed 4/8-bit forms tried: those of the lowest-drop all-4-bit candidates


def lm_block_sizes(matmul_rows: Sequence[int]) -> tuple[list[int], list[Skipped]]:
    """The LM_BLOCK_SIZES that divide the K (rows) of every weight MatMul, and a Skipped for each other: a
    block across K's end is padded, and a tied embedding cannot share the LM head's padded codes (SmolLM2,
    hidden 576, at 128). The smallest size is always kept, as quantize_lm's own block-size search does."""
    kept: list[int] = []
    left: list[Skipped] = []
    for block in LM_BLOCK_SIZES:
        bad = sorted({k for k in matmul_rows if k % block})
        if bad and block != min(LM_BLOCK_SIZES):
            left.append(
                Skipped(
                    f"int4 blocks of {block}",
                    f"{block} does not divide the MatMul rows {', '.join(map(str, bad))}: its blocks would be "
                    "padded (a tied embedding cannot share padded codes)",
                )
            )
        else:
            kept.append(block)
    return kept, left


def lm_candidates(block_sizes: Sequence[int] = LM_BLOCK_SIZES) -> list[Candidate]:
    """Every int4 scheme x block size of an LM folder, all MatMuls at 4 bits, cheapest first so that the
    time budget drops the costly ones: round-to-nearest (about a minute for SmolLM2-135M here), largest
    block first, then GPTQ (about ten: Hessians from calibration text, error-compensating rounding),
    smallest block first (the most accurate). Asymmetric blocks with fractional zero points (quantize_lm's
    default); the embedding shares the LM head's codes where they are tied."""
    found = []
    for scheme in LM_SCHEMES:
        blocks = sorted(block_sizes, reverse=scheme == "rtn")
        for block in blocks:
            found.append(
                Candidate(
                    f"int4-{scheme}-b{block}",
                    "int4",
                    (StageDesc("int4-lm", {"algorithm": scheme, "block_size": block}),),
                    f"4-bit {scheme.upper()}, blocks of {block}, every MatMul at 4 bits",
                )
            )
    return found


def lm_mixed(candidate: Candidate, all_four_bytes: int) -> Candidate:
    """`candidate` mixed 4/8-bit: quantize_lm's max_size_mb at LM_MIX_HEADROOM over its all-4-bit size, so
    the layers whose 4-bit weights raise calibration perplexity the most (measured, not by name) go to 8 bits
    while the budget allows."""
    budget_mb = round(all_four_bytes * (1 + LM_MIX_HEADROOM) / 1e6, 3)
    stages = tuple(
        StageDesc(s.kind, {**s.config, "max_size_mb": budget_mb}) if s.kind == "int4-lm" else s
        for s in candidate.stages
    )
    return Candidate(
        f"{candidate.name}-mix",
        candidate.precision,
        stages,
        f"{candidate.why.replace(', every MatMul at 4 bits', '')}; the layers with the largest measured "
        f"perplexity effect at 8 bits within {budget_mb:g} MB (+{LM_MIX_HEADROOM:.0%} over all 4-bit)",
    )
