"""What `dlopt package` is asked to build: PackageConfig (targets from dlopt.targets), its checks, the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlopt.data import DataSpec
from dlopt.errors import InputError
from dlopt.targets import capabilities, target_names

# The targets `dlopt package` builds a bundle for: those that declare package formats.
PACKAGE_TARGETS = tuple(target_names(package=True))
PTE_PRECISIONS = ("fp32", "int8", "int8-dynamic")  # int8-dynamic: linear layers, activations per run
# LM bundles (dlopt.optimize.executorch_lm): fp32 or 8da4w (int4 weights in groups, int8 activations per run)
LM_PTE_PRECISIONS = ("fp32", "8da4w")
Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class PackageConfig:
    target: str = "mobile"  # one of PACKAGE_TARGETS: mobile | cpu | cuda
    intended_ep: str | None = None  # mobile: cpu | xnnpack | nnapi | coreml (picks the ORT optimization style)
    fix_shapes: tuple[str, ...] = ()  # "input_ids=1x128": make dynamic input shapes static
    type_reduction: bool = False  # mobile: list kernel types in the operators config too
    coverage: bool = True  # mobile: NNAPI / CoreML coverage report
    samples: int = 2  # verification samples stored in the bundle
    batch: int = 1
    seq_len: int = 16  # size of dynamic axes other than the batch in generated samples
    input_shapes: tuple[str, ...] = ()  # NAME=DxD...: shapes of generated samples (--input-shape)
    atol: float = 1e-4  # packaged model vs source ONNX (a lossless conversion)
    rtol: float = 1e-3
    seed: int = 0
    measure_s: float = 2.0  # latency measurement per target after packaging; 0 skips it
    threads: int | None = None  # None: the target's own (phone-like for mobile), 1 otherwise
    torch_source: str | None = None  # reference model or factory: lower it to ExecuTorch .pte (XNNPACK)
    pte_precisions: tuple[str, ...] = ("fp32",)
    pte_fp32_min_sqnr_db: float = 60.0  # .pte vs source ONNX: a float lowering must agree to this floor
    pte_int8_min_sqnr_db: float = 15.0  # ... an int8 one (a lossy quantization) to this one
    calibration: str | DataSpec | None = None  # calibration data of the model (dlopt.data): hashed into the manifest
    pte_calibration_samples: int = 32  # samples for the int8 .pte's calibration
    pte_weight_rounding: str = "gptq"  # int8 .pte weights: gptq (on the calibration data) | nearest (stock)
    pte_bias_correction: bool = True  # int8 .pte: fold each conv/linear's mean rounding shift into its bias
    name: str | None = None  # model name in the manifest and model card (default: the file's stem)
    overwrite: bool = False  # replace an existing bundle folder


@dataclass(frozen=True)
class PackageResult:
    bundle: Path
    manifest: dict[str, Any]


def builds(config: PackageConfig, package_format: str) -> bool:
    """Whether the bundle for `config.target` holds `package_format` ("onnx", "ort" or "pte"), as the
    target declares (dlopt.targets.capabilities)."""
    return package_format in capabilities(config.target).package_formats


def _targets_building(package_format: str) -> str:
    """The package targets whose bundle holds `package_format`, as option placeholders."""
    names = [n for n in target_names(package=True) if package_format in capabilities(n).package_formats]
    return " or ".join(f"{{target={n}}}" for n in names)


def validate_config(config: PackageConfig) -> None:
    from dlopt.inputs import parse_input_shapes
    from dlopt.targets.mobile import INTENDED_EPS, parse_fix_shape

    packagable = target_names(package=True)
    if config.target not in packagable:
        raise InputError(f"unknown package target {config.target!r}", f"choose one of {', '.join(packagable)}")
    if config.intended_ep is not None:
        if not builds(config, "ort"):  # the intended EP picks the ORT format's optimization style
            raise InputError(
                f"an intended EP is for {_targets_building('ort')}, not {config.target}", "drop {intended_ep=EP}"
            )
        if config.intended_ep not in INTENDED_EPS:
            raise InputError(f"unknown intended EP {config.intended_ep!r}", f"choose one of {', '.join(INTENDED_EPS)}")
    for text in config.fix_shapes:
        parse_fix_shape(text)
    parse_input_shapes(config.input_shapes)
    from dlopt.limits import MAX_BATCH, MAX_MEASURE_S, MAX_SAMPLES, check_number

    # every number first: finite and of its type (a recipe's `samples = "2"` or `measure_s = nan` included)
    for name in ("samples", "batch", "seq_len", "seed", "pte_calibration_samples"):
        check_number(getattr(config, name), name, minimum=0, integer=True)
    if config.threads is not None:
        check_number(config.threads, "threads", minimum=1, integer=True)
    for name in ("atol", "rtol", "measure_s", "pte_fp32_min_sqnr_db", "pte_int8_min_sqnr_db"):
        check_number(getattr(config, name), name)
    MAX_SAMPLES.check(config.samples, "samples")  # before any sample is made
    MAX_BATCH.check(config.batch, "batch")
    MAX_MEASURE_S.check(config.measure_s, "measure_s (seconds of latency measurement)")
    if config.samples < 1:
        raise InputError(f"samples must be at least 1, got {config.samples}", "pass {samples=1} or more")
    if config.batch < 1 or config.seq_len < 1:
        raise InputError("batch and sequence length must be at least 1", "pass positive sizes")
    if config.atol < 0 or config.rtol < 0:
        raise InputError("tolerances must be non-negative", "pass {atol=TOL} and {rtol=TOL} >= 0")
    if config.threads is not None and config.threads < 1:
        raise InputError(f"threads must be at least 1, got {config.threads}", "pass {threads=1} or more")
    if config.measure_s < 0:
        raise InputError(f"measure time must be non-negative, got {config.measure_s}", "pass 0 to skip measuring")
    bad = [p for p in config.pte_precisions if p not in PTE_PRECISIONS + LM_PTE_PRECISIONS]
    if bad:
        raise InputError(
            f"unknown .pte precision(s) {bad}",
            f"choose from {', '.join(PTE_PRECISIONS)} ({', '.join(LM_PTE_PRECISIONS)} for an LM folder)",
        )
    from dlopt.optimize.pt2e import WEIGHT_ROUNDINGS  # the PT2E lowering's

    if config.pte_weight_rounding not in WEIGHT_ROUNDINGS:
        raise InputError(
            f"unknown .pte weight rounding {config.pte_weight_rounding!r}", f"choose {' or '.join(WEIGHT_ROUNDINGS)}"
        )
    if config.torch_source is not None and not builds(config, "pte"):
        pte_targets = _targets_building("pte")
        raise InputError(
            f"a torch source (ExecuTorch/XNNPACK programs) is for {pte_targets}",
            f"use {pte_targets}, or drop {{torch_source=SOURCE}}",
        )
