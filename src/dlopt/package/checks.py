"""Verification: sample inputs, the source model's outputs on them, and the packaged artifacts compared
against those within tolerances (also what `dlopt verify` re-runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import VerificationError
from dlopt.fileio import load_onnx
from dlopt.package.config import PackageConfig


def sample_inputs(
    model_path: Path, config: PackageConfig, data: Mapping[str, np.ndarray] | None
) -> list[dict[str, np.ndarray]]:
    """The sample inputs a bundle is checked on: `data`, else a reference model's real examples, else
    synthetic feeds within the model's value ranges."""
    from dlopt.fileio import load_onnx
    from dlopt.inputs import feeds_from_arrays, parse_input_shapes, session_inputs, synthetic_feeds, value_ranges
    from dlopt.sessions import trial_run

    session = bundle_session(model_path, {})
    specs = session_inputs(session)
    if data is not None:
        return [feeds_from_arrays(specs, data, "--data")]
    real = _reference_samples(config, specs)
    if real is not None:
        return real
    return synthetic_feeds(
        specs,
        count=config.samples,
        batch=config.batch,
        seq_len=config.seq_len,
        seed=config.seed,
        overrides=parse_input_shapes(config.input_shapes),
        ranges=value_ranges(load_onnx(model_path, load_external_data=False)),
        run=lambda feeds: trial_run(session, feeds),
    )


def _reference_samples(config: PackageConfig, specs) -> list[dict[str, np.ndarray]] | None:
    """With a reference model as --torch-source, its real example inputs as the samples (when they
    fit the ONNX model's inputs). An int8 .pte is calibrated on real data and must be checked on it:
    on N(0, 1) noise images EfficientNet-Lite0's int8 program measured 12.7 dB against the 15 dB
    floor (top-1 still agreeing), a property of the noise, not of the program."""
    from dlopt.models import REFERENCE_MODELS, get_reference_model

    if not (config.torch_source and config.torch_source in REFERENCE_MODELS):
        return None

    example = get_reference_model(config.torch_source).example_inputs(
        batch=config.batch * config.samples, seq_len=config.seq_len
    )
    arrays = {k: np.asarray(v) for k, v in example.items()}
    if {s.name for s in specs} != set(arrays) or any(len(s.shape) != arrays[s.name].ndim for s in specs):
        return None
    b = config.batch
    return [
        {s.name: np.ascontiguousarray(arrays[s.name][k * b : (k + 1) * b]) for s in specs}
        for k in range(config.samples)
    ]


def bundle_session(model: Path, session_config: Mapping[str, str], threads: int = 1):
    """A CPU session on a model the bundle holds or checks against; a file that does not load is a VerificationError."""
    from dlopt.sessions import cpu_session

    return cpu_session(
        model,
        threads=threads,
        graph_opt_level="all",
        config_entries=session_config,
        error=VerificationError,
        hint="the file is damaged or was written by an incompatible version",
    )


def run_onnx(model_path: Path, feeds_list: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The model's outputs ({name: array}) on each of `feeds_list`."""
    session = bundle_session(model_path, {})
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, dict(feeds)))) for feeds in feeds_list]


def write_samples(path: Path, feeds_list, expected) -> None:
    """Write the sample inputs and their expected outputs to the .npz at `path` (read back by read_samples)."""
    arrays = {}
    for k, (feeds, outs) in enumerate(zip(feeds_list, expected)):
        arrays.update({f"sample{k}.input.{n}": v for n, v in feeds.items()})
        arrays.update({f"sample{k}.expected.{n}": v for n, v in outs.items()})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def read_samples(path: Path) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Inverse of write_samples: (inputs per sample, expected outputs per sample)."""
    inputs: dict[int, dict[str, np.ndarray]] = {}
    expected: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            head, kind, name = key.split(".", 2)
            index = int(head[len("sample") :])
            (inputs if kind == "input" else expected).setdefault(index, {})[name] = archive[key]
    order = sorted(inputs)
    return [inputs[k] for k in order], [expected.get(k, {}) for k in order]


def compare(actual: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Difference measures of one output (dlopt.fidelity): max abs diff, SQNR of `actual` against
    `reference` in dB (inf when equal) and, for [batch, classes] outputs, top-1 agreement."""
    from dlopt.fidelity import compare_arrays

    a, r = np.asarray(actual), np.asarray(reference)
    if a.shape != r.shape:
        return {
            "shape_mismatch": [list(a.shape), list(r.shape)],
            "max_abs_diff": float("inf"),
            "sqnr_db": None,
            "top1_agreement": None,
        }
    measured = compare_arrays(a, r)
    return {
        "max_abs_diff": measured.max_abs_diff,
        "sqnr_db": measured.sqnr_db,
        "top1_agreement": measured.top1_agreement,
    }


def check_output(actual: np.ndarray, reference: np.ndarray, criterion: Mapping[str, float]) -> dict[str, Any]:
    """`compare` plus the verdict: allclose for {atol, rtol}, a floor for {min_sqnr_db}."""
    result = compare(actual, reference)
    if "shape_mismatch" in result:
        return result | {"passed": False}
    if "min_sqnr_db" in criterion:
        passed = bool(result["sqnr_db"] is not None and result["sqnr_db"] >= criterion["min_sqnr_db"])
    else:
        passed = bool(
            np.allclose(
                np.asarray(actual, np.float64),
                np.asarray(reference, np.float64),
                atol=criterion["atol"],
                rtol=criterion["rtol"],
            )
        )
    return result | {"passed": passed}


def verify_outputs(
    model: Path, session_config: Mapping[str, str], feeds_list, expected, criterion, *, artifact: str
) -> list[dict[str, Any]]:
    """Run the packaged ONNX/ORT model on each sample; one check per output over all samples."""
    session = bundle_session(model, session_config)
    names = [o.name for o in session.get_outputs()]
    got = [dict(zip(names, session.run(None, dict(feeds)))) for feeds in feeds_list]
    return output_checks(artifact, got, expected, criterion)


def output_checks(
    artifact: str,
    got: Sequence[Mapping[str, np.ndarray]],
    expected: Sequence[Mapping[str, np.ndarray]],
    criterion: Mapping[str, float],
) -> list[dict[str, Any]]:
    """One check per output of `artifact` over all samples: `got` against `expected` by `criterion`."""
    checks = []
    for output in expected[0]:
        if any(output not in g for g in got):
            checks.append(
                {
                    "artifact": artifact,
                    "output": output,
                    "criterion": dict(criterion),
                    "passed": False,
                    "max_abs_diff": float("inf"),
                    "sqnr_db": None,
                    "top1_agreement": None,
                    "detail": "output missing",
                }
            )
            continue
        actual = np.concatenate([np.asarray(g[output]).reshape(-1) for g in got])
        reference = np.concatenate([np.asarray(e[output]).reshape(-1) for e in expected])
        result = check_output(actual, reference, criterion)
        top1 = [compare(g[output], e[output])["top1_agreement"] for g, e in zip(got, expected)]
        result["top1_agreement"] = float(np.mean(top1)) if None not in top1 else None
        checks.append({"artifact": artifact, "output": output, "criterion": dict(criterion)} | result)
    return checks


def check_failure_text(check: Mapping[str, Any]) -> str:
    """Why one output check failed, in a line."""
    if "detail" in check:
        return check["detail"]
    if "shape_mismatch" in check:
        return f"shape {check['shape_mismatch'][0]} vs {check['shape_mismatch'][1]}"
    crit = check["criterion"]
    if "min_sqnr_db" in crit:
        return f"SQNR {check['sqnr_db']:.1f} dB < {crit['min_sqnr_db']} dB"
    return f"max |diff| {check['max_abs_diff']:.3g} beyond atol={crit['atol']:g}, rtol={crit['rtol']:g}"


def load_calibration(spec, model_path: Path, limit: int | None = None):
    """The calibration data of MODEL (a source text or a dlopt.data.DataSpec), read for its inputs."""
    from dlopt.data import load_data

    return load_data(spec, load_onnx(model_path, load_external_data=False), limit=limit)
