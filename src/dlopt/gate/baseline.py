"""Stored latency baselines (`dlopt bench --save-baseline`): writing, reading and checking them, and
which machine facts must match for a comparison.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError
from dlopt.gate.config import BASELINE_SCHEMA, BASELINE_VERSION

FINGERPRINT_KEYS = (
    "cpu_model",
    "cpu_flags_sha256",
    "logical_cores",
    "physical_cores",
    "machine",
    "onnxruntime",
    "threads",
    "device",
)


@dataclass(frozen=True, kw_only=True)
class StoredBatch:
    batch: int
    input_shapes: Mapping[str, tuple[int, ...]]
    samples_s: Mapping[str, np.ndarray]  # clock -> latencies in seconds


@dataclass(frozen=True, kw_only=True)
class StoredBaseline:
    path: Path
    created: str
    model: str
    sha256: str
    size_bytes: int
    target: str
    threads: int
    clock: str
    graph_opt_level: str
    seq_len: int
    seed: int
    inputs_from_data: bool
    fingerprint: Mapping[str, Any]
    batches: tuple[StoredBatch, ...]

    def batch_run(self, batch: int | None) -> StoredBatch:
        if batch is None:
            return self.batches[0]
        for b in self.batches:
            if b.batch == batch:
                return b
        raise InputError(
            f"baseline {self.path} has no measurements at batch {batch}",
            f"it has batch {', '.join(str(b.batch) for b in self.batches)}; pass one of those as "
            "{batch=N}, or save a baseline measured at that batch size",
        )


def baseline_document(result, *, index: int = 0, inputs_from_data: bool = False) -> dict[str, Any]:
    """The stored-baseline JSON for model `index` of a dlopt.bench.BenchResult
    (schema: dlopt/schemas/baseline.schema.json)."""
    model = result.models[index]
    config = result.config
    return {
        "schema": BASELINE_SCHEMA,
        "schema_version": BASELINE_VERSION,
        "created": result.created,
        "model": {"path": str(model.path), "sha256": model.sha256, "size_bytes": int(model.size_bytes)},
        "fingerprint": {k: result.machine.get(k) for k in FINGERPRINT_KEYS if k in result.machine},
        "measurement": {
            "target": result.target["name"],
            "runs_on": model.handle.runs_on,
            "threads": config.threads,
            "clock": result.clock,
            "graph_opt_level": config.graph_opt_level,
            "seq_len": config.seq_len,
            "seed": config.seed,
            "inputs": "data" if inputs_from_data else "generated",
        },
        "batches": [
            {
                "batch": b.batch,
                "input_shapes": {k: list(v) for k, v in b.input_shapes.items()},
                "rounds": b.rounds,
                "samples_ms": {c: np.round(b.models[index].samples[c] * 1e3, 6).tolist() for c in ("cpu", "wall")},
            }
            for b in result.batches
        ],
    }


def save_baseline(path: str | os.PathLike, result, *, index: int = 0, inputs_from_data: bool = False) -> Path:
    """Write model `index` of a bench result as a stored baseline (atomically); `dlopt bench
    --save-baseline FILE` calls this."""
    from dlopt.fileio import write_json_atomic

    if result.target.get("fell_back"):
        raise InputError(
            f"not saving {path}: the measurement fell back to the CPU",
            "save a baseline from a run on the target itself",
        )
    document = baseline_document(result, index=index, inputs_from_data=inputs_from_data)
    return write_json_atomic(path, document)


def load_baseline(path: str | os.PathLike) -> StoredBaseline:
    """Read and check a stored baseline; every way it can be wrong is an InputError naming the file."""
    p = Path(path)
    hint = "write it with `dlopt bench MODEL.onnx --save-baseline FILE`"
    if not p.is_file():
        raise InputError(
            f"baseline file {p} does not exist" if not p.exists() else f"baseline {p} is not a file", "check the path"
        )
    try:
        document = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"baseline file {p} is not valid JSON ({e})", hint) from e
    except OSError as e:
        raise InputError(f"cannot read baseline file {p}: {e.strerror or e}", "check its permissions") from e

    def bad(what: str) -> InputError:
        return InputError(f"baseline file {p} is not a dlopt baseline: {what}", hint)

    if isinstance(document, dict) and document.get("schema") == "dlopt.bench":
        raise InputError(
            f"baseline file {p} is a `dlopt bench --json` result, not a stored baseline",
            "save one with `dlopt bench MODEL.onnx --save-baseline FILE`",
        )
    if not isinstance(document, dict) or document.get("schema") != BASELINE_SCHEMA:
        raise bad(f"its 'schema' is not {BASELINE_SCHEMA!r}")
    if document.get("schema_version") != BASELINE_VERSION:
        raise InputError(
            f"baseline file {p} has schema version {document.get('schema_version')!r}",
            f"this dlopt reads version {BASELINE_VERSION}; save the baseline again",
        )
    try:
        model, measurement, fingerprint = document["model"], document["measurement"], document["fingerprint"]
        batches = []
        for entry in document["batches"]:
            samples = {}
            for clock, values in entry["samples_ms"].items():
                array = np.asarray(values, dtype=np.float64) / 1e3
                if array.ndim != 1 or array.size < 3 or not np.all(np.isfinite(array)) or np.any(array <= 0):
                    raise bad(f"batch {entry['batch']}: its {clock} samples are not 3 or more positive numbers")
                samples[clock] = array
            batches.append(
                StoredBatch(
                    batch=int(entry["batch"]),
                    input_shapes={k: tuple(int(d) for d in v) for k, v in entry["input_shapes"].items()},
                    samples_s=samples,
                )
            )
        if not batches:
            raise bad("it holds no measurements")
        for b in batches:
            if b.batch < 1 or any(d < 1 for shape in b.input_shapes.values() for d in shape):
                raise bad(f"batch {b.batch}: the batch size and input shapes {b.input_shapes} must be positive")
        for field_name in ("threads", "seq_len"):
            if int(measurement[field_name]) < 1:
                raise bad(f"its measurement {field_name} {measurement[field_name]} is not positive")
        clock = str(measurement["clock"])
        if any(clock not in b.samples_s for b in batches):
            raise bad(f"it has no samples for its own clock {clock!r}")
        return StoredBaseline(
            path=p,
            created=str(document.get("created", "")),
            model=str(model["path"]),
            sha256=str(model["sha256"]),
            size_bytes=int(model["size_bytes"]),
            target=str(measurement["target"]),
            threads=int(measurement["threads"]),
            clock=clock,
            graph_opt_level=str(measurement.get("graph_opt_level", "all")),
            seq_len=int(measurement["seq_len"]),
            seed=int(measurement["seed"]),
            inputs_from_data=measurement.get("inputs") == "data",
            fingerprint=dict(fingerprint),
            batches=tuple(batches),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, InputError):
            raise
        raise bad(f"missing or malformed field ({type(e).__name__}: {e})") from e


STORED_SAMPLES_MAX = 1000


def thin(samples: np.ndarray, most: int) -> np.ndarray:
    """At most `most` samples, evenly spaced over the run (so every phase of it stays represented).

    Why: each look bootstraps the median of the stored samples too; from thousands of samples (a
    fast model's bench run) that costs seconds per look while adding nothing the candidate's far
    fewer samples could use: the median of 1000 samples is already known to about 4 % of the
    spread."""
    if samples.size <= most:
        return samples
    return samples[np.linspace(0, samples.size - 1, most).round().astype(int)]


def fingerprint_differences(stored: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """'key: stored -> here' for each fingerprint entry that differs (keys absent on either side are skipped)."""
    return [
        f"{k}: {stored[k]!r} -> {here[k]!r}"
        for k in FINGERPRINT_KEYS
        if k in stored and k in here and stored[k] != here[k]
    ]
