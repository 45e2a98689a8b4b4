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
    from dlopt.bench import BenchConfig, benchmark, format_bench, sorted_by_length

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
    # the first model's sorted run against the first model as given: the same pairs of samples
    assert ls["latency"][0]["ratio_sorted_to_first"] == ls["latency"][0]["ratio_sorted_to_given"]
    text = format_bench(result)
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


# --------------------------------------------------------------------------- dlopt optimize

OPTIMIZE_SCHEMA = json.loads(files("dlopt").joinpath("schemas/optimize.schema.json").read_text())


def _sentences(n: int, seed: int, width: int = 24) -> dict[str, np.ndarray]:
    """Narrower than _mixed_lengths: the check pads 32 positions further, within the encoder's 64 positions."""
    rng = np.random.default_rng(seed)
    ids, mask = np.zeros((n, width), np.int64), np.zeros((n, width), np.int64)
    for i, length in enumerate(rng.integers(3, 22, n)):
        ids[i, :length], mask[i, :length] = rng.integers(1, 50, length), 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def trimmed_search(tmp_path_factory):
    """One search on the masked-mean encoder (cosine evaluator), with short measurements."""
    from click.testing import CliRunner

    from dlopt.cli import main
    from dlopt.search import driver

    work = tmp_path_factory.mktemp("optimize-trim")
    onnx.save(_encoder(pooled=True), work / "enc.onnx")
    np.savez(work / "calib.npz", **_sentences(24, 1))
    np.savez(work / "eval.npz", **_sentences(16, 2))
    fast = driver.OptimizeConfig.__init__.__kwdefaults__
    saved = dict(fast)
    fast.update(latency_budget_s=3.0, throughput_budget_s=0.5, batch_sizes=(1,), package_measure_s=0.0)
    try:
        result = CliRunner().invoke(main, [
            "optimize", str(work / "enc.onnx"), "--max-accuracy-drop", "0.01", "--evaluator", "cosine",
            "--calibration", str(work / "calib.npz"), "--eval-data", str(work / "eval.npz"), "--workers", "1",
            "-o", str(work / "out.bundle"), "--report", str(work / "report.html"), "--cache-dir", str(work / "cache"),
            "--json"])
    finally:
        fast.clear()
        fast.update(saved)
    return work, result


def test_optimize_tries_trimmed_candidates_with_their_equivalence(trimmed_search):
    _, result = trimmed_search
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    jsonschema.validate(data, OPTIMIZE_SCHEMA)
    trim = data["trim_padding"]
    assert trim["applies"] and trim["reason"] is None and trim["mask"] == "attention_mask"
    assert trim["sliced_inputs"] == ["input_ids", "attention_mask"] and trim["padded_back_outputs"] == []
    assert trim["check"]["equivalence_cosine"] >= 0.999 and trim["check"]["feeds"] > 1
    by_name = {c["name"]: c for c in data["candidates"]}
    fp32_trim = by_name["fp32+trim"]
    assert fp32_trim["recipe"] == [{"kind": "trim-padding", "mode": "on"}] and fp32_trim["drop_points"] < 1e-4
    assert fp32_trim["trim_padding"]["applied"] and fp32_trim["trim_padding"]["equivalence_cosine"] >= 0.999
    assert by_name["int8-auto"]["recipe"][0]["trim_padding"] == "off"  # the untrimmed form is untrimmed
    int8 = by_name["int8-auto+trim"]
    assert int8["recipe"] == [*by_name["int8-auto"]["recipe"], {"kind": "trim-padding", "mode": "on"}]
    assert int8["precision"] == "int8" and int8["trim_padding"]["untrimmed"] == "int8-auto"
    assert 0.99 <= int8["trim_padding"]["equivalence_cosine"] <= 1.0
    assert all(c["trim_padding"] is None for c in data["candidates"] if not c["name"].endswith("+trim"))
    # they compete on the same front: timed beside the untrimmed forms (or reasoned out of it)
    assert fp32_trim["status"] in ("chosen", "front", "dominated") and fp32_trim["latency_ratio"] is not None


def test_optimize_reports_the_gain_per_batch_size_and_sorting(trimmed_search):
    from dlopt.search.html_report import optimize_text

    work, result = trimmed_search
    data = json.loads(result.stdout)
    gain = data["trim_padding"]["gain"]
    assert gain["models"][:2] == ["fp32", "fp32+trim"] and gain["threads"] == 1
    assert [b["batch"] for b in gain["batches"]] == [1, 8]
    for b in gain["batches"]:
        assert b["input_shapes"] == {"input_ids": [b["batch"], 24], "attention_mask": [b["batch"], 24]}
        assert [r["name"] for r in b["rows"]] == gain["models"] and b["rows"][0]["ratio"] == 1.0
        assert [r["trimmed"] for r in b["rows"][:2]] == [False, True]
        assert all(r["ci"][0] <= r["ratio"] <= r["ci"][1] for r in b["rows"])
    one, eight = gain["batches"]
    assert one["length_sorting"] is None  # a batch of one cannot mix lengths
    sorting = eight["length_sorting"]
    assert sorting["tokens_sorted"] < sorting["tokens_as_given"] <= 24
    assert {row["model"] for row in sorting["latency"]} == set(gain["models"])
    text = optimize_text(data)
    # the form the stage reported: this encoder's unfused attention is sliced, and the text says why not packed
    assert data["trim_padding"]["form"] == "slice" and data["trim_padding"]["check"]["pack_reason"]
    assert ("padding removal: attention_mask slices input_ids, attention_mask to each batch's longest real length "
            "(not packed: ") in text and "packs" not in text
    assert "batch 8 (input_ids[8, 24], attention_mask[8, 24] padded" in text and "fp32+trim" in text
    assert "batch 8, sorted by length: fp32+trim" in text and "of FP32's as given" in text
    page = (work / "report.html").read_text()
    assert "<h2>Padding removal</h2>" in page and "batch 8: latency / FP32" in page


def test_trim_check_says_why_not_for_an_output_that_depends_on_padding(tmp_path):
    from dlopt.recipe import artifact_hash
    from dlopt.search.scoring import SearchContext, trim_check

    onnx.save(_encoder(pooled=True, masked_pooling=False), tmp_path / "mean.onnx")
    np.savez(tmp_path / "calib.npz", **_sentences(12, 3))
    ctx = SearchContext(source=str(tmp_path / "mean.onnx"), torch_source=False, source_id="x", target="cpu",
                        calibration=str(tmp_path / "calib.npz"), eval_data=None, evaluator="cosine",
                        cache_root=str(tmp_path / "cache"), name="mean")
    found = trim_check(ctx, str(tmp_path / "mean.onnx"), artifact_hash(tmp_path / "mean.onnx"))
    assert not found["applies"] and "outputs depend on the padding: embedding" in found["reason"]
    assert found["check"]["equivalence_cosine"] < 0.999


def test_trim_lines_say_the_form_the_stage_reported():
    """The optimize report's padding-removal text follows the trim-padding stage's `form`: pack or slice."""
    from dlopt.search.html_report import trim_lines

    check = {"applied": True, "reason": None, "equivalence_cosine": 0.99999, "feeds": 3, "input_shapes": [],
             "form": "pack", "pack_reason": None}
    trim = {"applies": True, "reason": None, "mask": "attention_mask", "sliced_inputs": ["input_ids", "attention_mask"],
            "padded_back_outputs": [], "min_cosine_required": 0.999, "check": check, "gain": None}
    packed = trim_lines({**trim, "form": "pack"})[0]
    assert packed.startswith("padding removal: attention_mask packs input_ids, attention_mask to the real tokens of "
                             "all rows, computed as one sequence; FP32 trimmed vs untrimmed cosine 0.999990")
    assert "longest real length" not in packed
    sliced = trim_lines({**trim, "form": "slice", "check": {**check, "form": "slice", "pack_reason": "a Conv mixes "
                                                                                                     "tokens"}})[0]
    assert sliced.startswith("padding removal: attention_mask slices input_ids, attention_mask to each batch's "
                             "longest real length (not packed: a Conv mixes tokens); ")
