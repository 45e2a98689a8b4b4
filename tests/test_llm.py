"""Decoder LMs for generation: `dlopt export --task text-generation` (a KV-cache decoder built by
onnxruntime-genai's model builder, verified against transformers) and `dlopt bench --generate`.

A tiny randomly initialised Llama (2 layers, hidden 64, grouped-query attention 4/2 heads, a 300-token
byte-level BPE tokenizer trained in code) keeps these fast; SmolLM2 runs only in the heavy test."""

from __future__ import annotations

import json
import shutil
from importlib.resources import files

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402

from dlopt.cli import main  # noqa: E402

LAYERS = 2
TEXT = ["the quick brown fox jumps over the lazy dog", "a small language model writes text one token at a time",
        "each new token reads the keys and values of every token before it from the cache"] * 10


def build_tiny_llama(folder, seed: int = 0, tokenizer: bool = True):
    """A Llama-style causal LM folder (config, safetensors, tokenizer.json) as save_pretrained writes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    if tokenizer:
        fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is near-uniform: sharpen the logits so greedy choices are clear-cut
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "lm"
    result = CliRunner().invoke(main, ["export", str(tiny), "--task", "text-generation", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_a_fused_kv_cache_decoder(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "export.json"} <= names
    report = json.loads((exported / "export.json").read_text())
    graph = report["graph"]
    assert graph["fused"]["GroupQueryAttention"] == LAYERS
    assert graph["fused"]["SkipSimplifiedLayerNormalization"] >= LAYERS
    assert graph["fused_qkv"]
    assert graph["kv_cache"]["tensors"] == 2 * LAYERS  # a key and a value per layer
    (name, dims), = graph["kv_cache"]["example"].items()
    assert name == "past_key_values.0.key" and dims[:3] == ["batch_size", 2, "past_sequence_length"]  # [B, kv_heads, past, head_dim]
    assert "Attention" not in graph["op_types"] and "Softmax" not in graph["op_types"]  # nothing left unfused


def test_export_matches_transformers_over_prefill_and_8_decode_steps(exported):
    v = json.loads((exported / "export.json").read_text())["verification"]
    assert v["passed"] and v["decode_steps"] == 8 and len(v["steps"]) == 9
    for step in v["steps"]:
        assert step["max_abs_diff"] < 1e-4, step  # fp32: the fused kernels agree with torch to ~1e-6
        assert step["exported_token"] == step["reference_token"]
    assert v["greedy_exported"] == v["greedy_reference"]
    assert len(set(v["greedy_reference"])) > 1  # a continuation that says something, not one repeated token


def test_exported_folder_generates_like_transformers(tiny, exported):
    """Independent of the export's own check: transformers' generate() against onnxruntime-genai's
    generate loop on another prompt, 12 greedy tokens with the KV cache."""
    import onnxruntime_genai as og

    prompt = np.arange(40, 60, dtype=np.int64)[None]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    want = model.generate(torch.from_numpy(prompt), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=2)[0, prompt.shape[1]:].tolist()
    lm = og.Model(str(exported))
    params = og.GeneratorParams(lm)
    params.set_search_options(do_sample=False, max_length=prompt.shape[1] + 12, min_length=prompt.shape[1] + 12)
    generator = og.Generator(lm, params)
    generator.append_tokens(prompt.astype(np.int32))
    got = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    assert got == want


def test_verification_fails_against_other_weights(exported, tmp_path):
    from dlopt.optimize.export_lm import verify_export

    other = build_tiny_llama(tmp_path / "other", seed=1)
    v = verify_export(exported, other)
    assert not v["passed"]
    assert v["steps"][0]["max_abs_diff"] > v["steps"][0]["tolerance"]


def test_a_mismatch_writes_nothing_and_exits_1(tiny, exported, tmp_path, monkeypatch):
    from dlopt.optimize import export_lm

    reference = export_lm._reference_logits

    def built(source, out, precision, cache, log):  # the builder's output, without a second 10 s build
        shutil.copytree(exported, out, ignore=shutil.ignore_patterns("export.json"))

    def drifted(hf_folder, prompt, steps):  # the export drifts from its source at decode step 3
        logits, tokens = reference(hf_folder, prompt, steps)
        logits[3] = logits[3] + 0.5
        return logits, tokens

    monkeypatch.setattr(export_lm, "_reference_logits", drifted)
    monkeypatch.setattr(export_lm, "_run_builder", built)
    out = tmp_path / "lm"
    result = CliRunner().invoke(main, ["export", str(tiny), "--task", "text-generation", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "decode step 3" in result.output and "nothing written" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-built folder left beside it either


def _bad_folders(tiny, tmp_path):
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(tiny, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(bert)
    shutil.copy(tiny / "tokenizer.json", bert / "tokenizer.json")
    return {"no_tokenizer": no_tokenizer, "bert": bert, "missing": tmp_path / "missing",
            "file": tiny / "config.json"}


@pytest.mark.parametrize("case,message", [
    ("no_tokenizer", "has no tokenizer (tokenizer.json or tokenizer.model)"),
    ("bert", "not a causal language model"),
    ("missing", "does not exist"),
    ("file", "is not a folder"),
])
def test_export_bad_input_is_one_line_and_exit_2(tiny, tmp_path, case, message):
    source = _bad_folders(tiny, tmp_path)[case]
    out = tmp_path / "lm"
    result = CliRunner().invoke(main, ["export", str(source), "--task", "text-generation", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) <= 2  # message + hint
    assert not out.exists()


def test_export_of_a_model_folder_without_task_says_which_task(tiny, tmp_path):
    result = CliRunner().invoke(main, ["export", str(tiny), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--task text-generation" in result.output


def test_export_refuses_a_non_empty_output_folder(tiny, tmp_path):
    out = tmp_path / "lm"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["export", str(tiny), "--task", "text-generation", "-o", str(out)])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_bench_generate_json_validates_against_its_schema(exported, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "gen.json"
    result = CliRunner().invoke(main, ["bench", str(exported), str(exported), "--generate", "--prompt-len", "24",
                                       "--new-tokens", "10", "--rounds", "4", "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "decode tok/s" in result.output and "prefill" in result.output
    data = json.loads(out.read_text())
    schema = json.loads(files("dlopt").joinpath("schemas/bench_generate.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(data, schema)
    batch, = data["batches"]
    first, second = batch["results"]
    assert batch["rounds"] == 4 and first["tokens_generated"] == 10
    for r in (first, second):
        assert len(r["samples_ms"]["decode_per_token"]["cpu"]) == 4
        t = r["time_to_first_token_ms"]["wall"]["median"]
        assert t >= r["prefill_ms"]["wall"]["median"] > 0  # the first token comes after the prefill
        assert r["decode_tokens_per_s"] == pytest.approx(1e3 / r["decode_ms_per_token"]["cpu"]["median"])
    assert first["ratio"]["decode_per_token"]["cpu"] is None
    ratio = second["ratio"]["decode_per_token"]["cpu"]
    assert ratio["low"] <= ratio["estimate"] <= ratio["high"]
    assert data["peak_rss_bytes"] > 0 and first["peak_rss_added_bytes"] >= 0


def test_bench_generate_batches_prompts(exported):
    from dlopt.api import GenerateConfig, bench_generate

    result = bench_generate([exported], GenerateConfig(prompt_len=8, new_tokens=5, batch_sizes=(2,), rounds=2)).result
    run, = result.batches[0].models
    assert result.batches[0].batch == 2 and run.tokens_generated == 5


@pytest.mark.parametrize("args,message", [
    (["--new-tokens", "0"], "new tokens must be at least 1, got 0"),
    (["--new-tokens", "-3"], "new tokens must be at least 1, got -3"),
    (["--prompt-len", "250", "--new-tokens", "10"], "exceeds the context"),
    (["--prompt-len", "0"], "the prompt length must be at least 1"),
])
def test_bench_generate_bad_input_is_exit_2(exported, args, message):
    result = CliRunner().invoke(main, ["bench", str(exported), "--generate", *args, "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bench_generate_refuses_a_folder_that_is_not_an_export(tiny):
    result = CliRunner().invoke(main, ["bench", str(tiny), "--generate", "--no-progress"])
    assert result.exit_code == 2 and "is a Hugging Face model folder, not an exported LM (no genai_config.json)" in result.output


@pytest.mark.heavy
def test_smollm2_exports_and_generates(tmp_path):
    """SmolLM2-135M (30 layers): verified export and a short generation benchmark."""
    out = tmp_path / "lm"
    result = CliRunner().invoke(main, ["export", "smollm2", "--task", "text-generation", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export.json").read_text())
    assert report["verification"]["passed"] and report["graph"]["fused"]["GroupQueryAttention"] == 30
    result = CliRunner().invoke(main, ["bench", str(out), "--generate", "--prompt-len", "32", "--new-tokens", "16",
                                       "--rounds", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
