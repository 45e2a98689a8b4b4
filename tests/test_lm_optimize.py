"""LM folders in recipes and the optimize search: `dlopt run` with export-lm, int4-lm and package-lm (the shape
of recipes/smollm2-int4.toml), and `dlopt optimize LM_FOLDER --max-accuracy-drop X` (X: relative perplexity
increase) over int4 schemes x block size x 4/8 mix, on the tiny random Llama of test_llm (2 layers, a
300-token BPE). SmolLM2 runs the recipe only in the heavy test."""

from __future__ import annotations

import json
import shutil
from importlib.resources import files

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")
pytest.importorskip("torch")
pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

from click.testing import CliRunner  # noqa: E402

from dlopt.cli import main  # noqa: E402
from test_llm import _text, build_tiny_llama  # noqa: E402

BUDGET = 0.05  # +5 % perplexity over FP32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    base = tmp_path_factory.mktemp("text")
    return _text(base / "calibration.txt", seed=1), _text(base / "held_out.txt", seed=2, words=1200)


@pytest.fixture(scope="module")
def lm(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "lm"
    result = CliRunner().invoke(main, ["export", str(tiny), "--task", "text-generation", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _ops(folder):
    import onnx

    return {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}


# --------------------------------------------------------------------------- dlopt run: LM stages

RECIPE = """
source = "hf"
target = "cpu"
calibration = "calibration.txt"
eval_data = "held_out.txt"
name = "tiny-int4"

[[stage]]
kind = "export-lm"

[[stage]]
kind = "int4-lm"
algorithm = "gptq"
max_size_mb = {max_size}

[[stage]]
kind = "package-lm"
measure_s = 0.0
"""


@pytest.fixture(scope="module")
def recipe_run(tiny, texts, tmp_path_factory):
    """The recipe of recipes/smollm2-int4.toml, on the tiny model: run once, then again (all cached)."""
    base = tmp_path_factory.mktemp("recipe")
    shutil.copytree(tiny, base / "hf")
    for text in texts:
        shutil.copy(text, base / text.name)
    recipe = base / "tiny-int4.toml"
    recipe.write_text(RECIPE.format(max_size=0.3))  # all-4-bit is ~0.19 MB: room for 8-bit layers
    cache = base / "cache"
    first = CliRunner().invoke(main, ["run", str(recipe), "-o", str(base / "bundle"), "--cache-dir", str(cache)])
    again = CliRunner().invoke(main, ["run", str(recipe), "-o", str(base / "again"), "--cache-dir", str(cache)])
    return base, cache, first, again


def _entry(cache, kind):
    found = [json.loads(p.read_text()) for p in cache.glob("*/entry.json")]
    (entry,) = [e for e in found if e.get("kind") == kind]
    return entry


def test_recipe_exports_quantizes_scores_and_bundles_an_lm(recipe_run):
    base, cache, first, _ = recipe_run
    assert first.exit_code == 0, first.output
    assert [line.split()[1] for line in first.output.splitlines() if line[:1].isdigit()] == [
        "export-lm", "int4-lm", "package-lm"]
    manifest = json.loads((base / "bundle" / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["verification"]["samples"] >= 1
    # the int4 stage: MatMulNBits in the graph, the size budget kept, perplexity on the held-out text reported
    entry = _entry(cache, "int4-lm")
    folder = cache / entry["key"] / entry["artifact"]
    report = json.loads((folder / "quantize.json").read_text())
    assert "MatMulNBits" in _ops(folder) and report["float_matmuls"] == []  # every weight MatMul quantized
    assert report["algorithm"] == "gptq" and report["bytes_after"] <= 0.3e6
    held = entry["report"]["held_out"]
    assert held["text"].endswith("held_out.txt") and held["tokens"] > 500
    # 4-bit weights of a random 64-wide model: held-out perplexity within 10 % of the FP32 export's
    assert abs(held["perplexity_ratio"] - 1) < 0.10, held
    assert held["perplexity"] == pytest.approx(held["fp32_perplexity"] * held["perplexity_ratio"], rel=1e-6)


def test_recipe_bundle_verifies_and_rerun_is_cached(recipe_run):
    base, _, _, again = recipe_run
    assert again.exit_code == 0, again.output
    stages = [line.split() for line in again.output.splitlines() if line[:1].isdigit()]
    assert [s[2] for s in stages] == ["cached"] * 3
    result = CliRunner().invoke(main, ["verify", str(base / "again")])
    assert result.exit_code == 0, result.output


def test_recipe_ending_with_int4_lm_writes_an_lm_folder(lm, texts, tmp_path):
    """An exported LM folder as the source, one int4-lm stage (RTN, no text needed): -o is that LM folder."""
    (tmp_path / "r.toml").write_text(
        f'source = "{lm}"\n\n[[stage]]\nkind = "int4-lm"\nalgorithm = "rtn"\nblock_size = 32\n'
    )
    out = tmp_path / "lm4"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.toml"), "-o", str(out), "--cache-dir",
                                       str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert {"genai_config.json", "tokenizer.json", "model.onnx", "quantize.json"} <= {p.name for p in out.iterdir()}
    assert "MatMulNBits" in _ops(out)
    assert json.loads((out / "quantize.json").read_text())["block_size"] == 32


@pytest.mark.parametrize("stages,message", [
    ('[[stage]]\nkind = "int4-lm"\n', 'add [[stage]] kind = "export-lm" first'),
    ('[[stage]]\nkind = "export-lm"\n[[stage]]\nkind = "int8-dynamic"\n', "int8-dynamic takes a onnx model"),
    ('[[stage]]\nkind = "export-lm"\n[[stage]]\nkind = "package"\n', "package takes a onnx model"),
])
def test_recipe_whose_lm_stages_do_not_chain_is_exit_2(tiny, tmp_path, stages, message):
    (tmp_path / "r.toml").write_text(f'source = "{tiny}"\n\n{stages}')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) <= 2


def test_smollm2_recipe_reads(tmp_path):
    """recipes/smollm2-int4.toml as shipped: the stages chain and their keys are valid (running it is heavy)."""
    from pathlib import Path

    from dlopt.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "smollm2-int4.toml")
    assert [s.kind for s in recipe.stages] == ["export-lm", "int4-lm", "package-lm"]
    assert recipe.stages[1].config.max_size_mb == 100.0 and recipe.stages[1].config.algorithm == "gptq"
    assert recipe.calibration == "model:smollm2" and recipe.eval_data == "model:smollm2"


@pytest.mark.heavy
def test_smollm2_recipe_runs_end_to_end(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).parent.parent / "recipes" / "smollm2-int4.toml"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "bundle"), "--cache-dir",
                                       str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    entry = _entry(tmp_path / "cache", "int4-lm")
    assert entry["report"]["bytes_after"] <= 100e6
    assert entry["report"]["held_out"]["perplexity_ratio"] < 1.05  # GPTQ + 8-bit layers: +2-3 % measured
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "bundle")]).exit_code == 0


# --------------------------------------------------------------------------- dlopt optimize LM_FOLDER

SCHEMA = json.loads(files("dlopt").joinpath("schemas/optimize.schema.json").read_text())


@pytest.fixture(scope="module")
def searched(lm, texts, tmp_path_factory):
    base = tmp_path_factory.mktemp("optimize")
    calibration, held_out = texts
    args = ["optimize", str(lm), "--calibration", str(calibration), "--eval-data", str(held_out),
            "--max-accuracy-drop", str(BUDGET), "--time-budget", "10m", "--cache-dir", str(base / "cache"),
            "--json"]
    first = CliRunner().invoke(main, [*args, "-o", str(base / "bundle")])
    again = CliRunner().invoke(main, [*args, "-o", str(base / "again")])
    return base, first, again


def _result(outcome):
    assert outcome.exit_code == 0, outcome.output
    return json.loads(outcome.output[outcome.output.index("{"):])


def test_lm_search_covers_schemes_blocks_and_mix_and_validates(searched):
    _, first, _ = searched
    result = _result(first)
    jsonschema.validate(result, SCHEMA)
    assert result["evaluator"] == "perplexity" and "0.03 = +3 %" in result["drop_unit"]
    rows = {c["name"]: c for c in result["candidates"]}
    grid = {f"int4-{s}-b{b}" for s in ("rtn", "gptq") for b in (32, 64)}
    assert grid <= set(rows)  # each evaluated (or skipped for time, with the reason)
    # blocks of 128 would be padded across the tiny model's hidden size (64): listed, not tried
    assert rows["int4 blocks of 128"]["status"] == "skipped"
    assert "128 does not divide the MatMul rows 64" in rows["int4 blocks of 128"]["reason"]
    assert not any(n.endswith("-b128") for n in rows)
    mixes = [n for n in rows if n.endswith("-mix")]
    assert 1 <= len(mixes) <= 2
    for name in grid | set(mixes):
        row = rows[name]
        assert row["precision"] == "int4" and row["recipe"][0]["kind"] == "int4-lm"
        if row["status"] == "skipped":
            assert "time budget" in row["reason"]
            continue
        assert row["score"] == pytest.approx(row["perplexity"] / rows["fp32"]["perplexity"], rel=1e-6)
        assert row["drop_points"] == pytest.approx(row["score"] - 1, abs=1e-8)  # the relative increase
        assert row["bytes"] < 0.6 * rows["fp32"]["bytes"]  # 4-bit weights (the tiny model's norms stay float)
    block = {n: rows[n]["recipe"][0].get("block_size") for n in grid}
    assert block == {n: int(n.rsplit("b", 1)[1]) for n in grid}
    for name in mixes:  # the size budget: LM_MIX_HEADROOM over its all-4-bit form, kept
        budget = rows[name]["recipe"][0]["max_size_mb"]
        base_row = rows[name.removesuffix("-mix")]
        assert budget == pytest.approx(base_row["bytes"] * 1.10 / 1e6, abs=5e-4)  # rounded to 1 kB (0.2 % here)
        assert rows[name]["bytes"] <= budget * 1e6


def test_lm_front_is_non_dominated_and_the_choice_is_within_the_perplexity_budget(searched):
    from dlopt.search.pareto import Point, dominates

    result = _result(searched[1])
    rows = {c["name"]: c for c in result["candidates"]}
    timed = [c for c in rows.values() if c["latency_ratio"] is not None]
    points = {c["name"]: Point(c["name"], c["latency_ratio"], c["drop_points"], c["bytes"]) for c in timed}
    assert result["front"] and set(result["front"]) <= set(points)
    for name in result["front"]:
        assert not any(dominates(q, points[name]) for q in points.values() if q.name != name), name
    for c in timed:  # every timed candidate: decode tokens/s, the inverse of its decode time per token
        assert c["decode_tokens_per_s"] == pytest.approx(1e3 / c["median_ms"], rel=1e-6)
        assert c["prefill_ms"] > 0
    chosen = rows[result["chosen"]]
    assert chosen["status"] == "chosen" and chosen["name"] in result["front"]
    assert chosen["perplexity"] <= rows["fp32"]["perplexity"] * (1 + BUDGET)
    within = [points[n] for n in result["front"] if points[n].drop <= BUDGET]
    assert chosen["latency_ratio"] <= min(p.latency for p in within) * 1.01  # the fastest (1 % ties)
    assert result["latency"]["clock"] == "thread CPU time" and result["latency"]["threads"] == 1
    assert result["verified"] is True


def test_lm_search_bundle_and_rerun_from_the_cache(searched):
    base, first, again = searched
    result = _result(again)
    assert result["cache"]["evaluations_run"] == 0 and result["latency"]["cached"] is True
    assert result["chosen"] == _result(first)["chosen"]
    assert CliRunner().invoke(main, ["verify", str(base / "again")]).exit_code == 0


def test_lm_search_prints_the_front_table(lm, texts, searched):
    """Without --json: the table with perplexity, its rise, decode tokens/s and the generation settings."""
    base, _, _ = searched
    calibration, held_out = texts
    result = CliRunner().invoke(main, ["optimize", str(lm), "--calibration", str(calibration), "--eval-data",
                                       str(held_out), "--max-accuracy-drop", str(BUDGET), "--time-budget", "10m",
                                       "--cache-dir", str(base / "cache"), "-o", str(base / "table")])
    assert result.exit_code == 0, result.output
    head = next(line for line in result.output.splitlines() if line.startswith("candidate"))
    assert "perplexity" in head and "decode tok/s" in head and "vs FP32" in head
    assert "front (decode tok/s x perplexity x size)" in result.output and "budget: perplexity +5 %" in result.output


def _bad_cases(lm, texts, tmp_path):
    calibration, held_out = texts
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox jumps over the lazy dog\n")
    quantized = tmp_path / "lm4"
    shutil.copytree(lm, quantized)
    import onnx

    model = onnx.load(str(quantized / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "MatMul")
    node.op_type, node.domain = "MatMulNBits", "com.microsoft"
    onnx.save(model, str(quantized / "model.onnx"))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(lm, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    return {
        "no calibration": (lm, ["--eval-data", str(held_out)], "no calibration text"),
        "no eval data": (lm, ["--calibration", str(calibration)], "no held-out text"),
        "same text": (lm, ["--calibration", str(calibration), "--eval-data", str(calibration)],
                      "is the calibration text"),
        "short calibration": (lm, ["--calibration", str(short), "--eval-data", str(held_out)], "too few for 3 windows"),
        "missing text": (lm, ["--calibration", str(tmp_path / "nope.txt"), "--eval-data", str(held_out)],
                         "does not exist"),
        "evaluator": (lm, ["--calibration", str(calibration), "--eval-data", str(held_out), "--evaluator", "cosine"],
                      "scored by held-out perplexity, not cosine"),
        "quantized": (quantized, ["--calibration", str(calibration), "--eval-data", str(held_out)],
                      "is already quantized"),
        "no tokenizer": (no_tokenizer, ["--calibration", str(calibration), "--eval-data", str(held_out)],
                         "has no tokenizer"),
    }


CASES = ("no calibration", "no eval data", "same text", "short calibration", "missing text", "evaluator", "quantized",
         "no tokenizer")


@pytest.mark.parametrize("case", CASES)
def test_lm_search_bad_input_is_one_line_and_exit_2(lm, texts, tmp_path, case):
    folder, args, message = _bad_cases(lm, texts, tmp_path)[case]
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["optimize", str(folder), "--max-accuracy-drop", "0.03", *args, "-o", str(out),
                                       "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith(("[", "dlopt optimize:"))]
    assert lines[0].startswith("error: ") and len(lines) <= 2, result.output  # message + hint
    assert not out.exists()


def test_lm_generation_shape_fits_the_context(lm):
    from dlopt.search.scoring import LM_NEW_TOKENS, LM_PROMPT_LEN, lm_generation_shape

    prompt, new = lm_generation_shape(lm)  # the tiny model's context is 256 tokens
    assert prompt == 64 and new == LM_NEW_TOKENS and prompt + new <= 256 and LM_PROMPT_LEN == 128
    assert np.isfinite(prompt)
