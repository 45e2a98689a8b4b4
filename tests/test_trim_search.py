"""Padding removal in the product: `dlopt bench` and the bundle card time batches of mixed real lengths as
given and sorted by length; `dlopt optimize` tries trimmed candidates where held-out inputs confirm
equivalence, reports the gain per batch size, and says why not for a model without a mask. Structure and
numbers that do not depend on the host's speed are asserted, never timings."""

import json
from importlib.resources import files

import jsonschema
import numpy as np
import onnx
import pytest
from test_trim_padding import _encoder

from dlopt.optimize.trim_padding import trim_padding_graph

BENCH_SCHEMA = json.loads(files("dlopt").joinpath("schemas/bench.schema.json").read_text())
MANIFEST_SCHEMA = json.loads(files("dlopt").joinpath("schemas/manifest.schema.json").read_text())


def _mixed_lengths(n: int = 32, width: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` right-padded sentences of 3..39 real tokens: batches of 8 mix lengths."""
    rng = np.random.default_rng(seed)
    ids, mask = np.zeros((n, width), np.int64), np.zeros((n, width), np.int64)
    for i, length in enumerate(rng.integers(3, 40, n)):
        ids[i, :length], mask[i, :length] = rng.integers(1, 50, length), 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    work = tmp_path_factory.mktemp("trim")
    model = _encoder(pooled=True)
    onnx.save(model, work / "enc.onnx")
    onnx.save(trim_padding_graph(model)[0], work / "enc_trim.onnx")
    return work


def test_bench_times_batches_sorted_by_length_beside_as_given(encoders):
    from dlopt.bench import BenchConfig, benchmark, format_result, sorted_by_length

    data = _mixed_lengths()
    ordered = sorted_by_length(data, 8)
    lengths = ordered["attention_mask"].sum(axis=1)
    assert list(lengths) == sorted(lengths) and sorted(lengths) == sorted(data["attention_mask"].sum(axis=1))
    config = BenchConfig(batch_sizes=(1, 8), rounds=4, clock="cpu")
    result = benchmark([encoders / "enc.onnx", encoders / "enc_trim.onnx"], config, data=data, data_source="mixed")
    doc = result.to_dict()
    jsonschema.validate(doc, BENCH_SCHEMA)
    one, eight = doc["batches"]
    assert "length_sorting" not in one  # one sample per batch: nothing to sort
    ls = eight["length_sorting"]
    assert ls["input_shapes"] == {"input_ids": [8, 48], "attention_mask": [8, 48]} and ls["padded_length"] == 48
    assert ls["tokens_sorted"] < ls["tokens_as_given"] <= 48
    assert [row["model"] for row in ls["latency"]] == ["enc.onnx", "enc_trim.onnx"]
    for row in ls["latency"]:
        ratio = row["ratio_sorted_to_given"]
        assert ratio["low"] <= ratio["estimate"] <= ratio["high"] and row["median_ms_sorted"] > 0
    text = format_result(result)
    assert "sorted by length, enc_trim.onnx takes" in text and "input_ids[8, 48]" in text


def test_bundle_card_shows_both_orderings(encoders, tmp_path):
    from dlopt.package import PackageConfig, package

    result = package(encoders / "enc_trim.onnx", tmp_path / "bundle",
                     PackageConfig(target="cpu", measure_s=0.5), data=_mixed_lengths())
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    jsonschema.validate(manifest, MANIFEST_SCHEMA)
    sorting = manifest["length_sorting"]
    assert sorting == result.manifest["length_sorting"] and sorting["batch"] == 8
    assert sorting["input_shapes"] == {"input_ids": [8, 48], "attention_mask": [8, 48]}
    card = (tmp_path / "bundle" / "README.md").read_text()
    section = card[card.index("## Sorting requests by length"):]
    assert "| as given | 35.8 |" in section and "| sorted by length | 26.0 |" in section
    assert "`input_ids` [8, 48]" in section


def test_bundle_of_a_model_without_a_mask_has_no_sorting_section(tmp_path):
    from test_quantize_int8 import cnn_model

    from dlopt.package import PackageConfig, package

    onnx.save(cnn_model(), tmp_path / "cnn.onnx")
    package(tmp_path / "cnn.onnx", tmp_path / "bundle", PackageConfig(target="cpu", measure_s=0.2))
    assert "length_sorting" not in json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert "Sorting requests by length" not in (tmp_path / "bundle" / "README.md").read_text()
