"""Decoder LMs for generation: `dlopt export --task text-generation` (a KV-cache decoder built by
onnxruntime-genai's model builder, verified against transformers) and `dlopt bench --generate`.

A tiny randomly initialised Llama (2 layers, hidden 64, grouped-query attention 4/2 heads, a 300-token
byte-level BPE tokenizer trained in code) keeps these fast; SmolLM2 runs only in the heavy test."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
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


def build_tiny_llama(folder, seed: int = 0, tokenizer: bool = True, tied: bool = False, q4_1_grid: bool = False):
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
                                      tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is near-uniform: sharpen the logits so greedy choices are clear-cut
        model.lm_head.weight.mul_(8.0)
        if q4_1_grid:  # every Linear's weight on a GGUF Q4_1 grid, as dequantized GGUF models (SmolLM2) are
            from dlopt.optimize.int4.blocks import dequantize_blocks, quantize_blocks_float

            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight.numpy()  # [out, in]: blocks of 32 along the input, as Q4_1's
                    module.weight.copy_(torch.from_numpy(dequantize_blocks(*quantize_blocks_float(w, 32), 32)))
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
        # One thread's CPU time never exceeds the wall time, up to the two clocks' reads (a few µs, in ms here)
        # and their rate difference: sched_clock and CLOCK_MONOTONIC are separate clocks on a VM.
        for phase, per_clock in r["samples_ms"].items():
            assert all(c <= w * 1.01 + 0.05 for c, w in zip(per_clock["cpu"], per_clock["wall"])), (phase, per_clock)
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


# -- 4-bit and mixed 4/8-bit LM folders (dlopt quantize LM --precision int4), the LM row of dlopt eval ---------
def _text(path, seed: int, words: int = 2500):
    """Text in the tiny tokenizer's vocabulary: the training sentences' words in a seeded random order."""
    vocab = " ".join(TEXT).split()
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(rng.choice(vocab, size=words)) + "\n", encoding="utf-8")
    return path


def _prefill_logits(folder, ids):
    import onnx

    from dlopt.lm import lm_session, prefill_feeds, read_genai_config

    head = read_genai_config(folder)["model"]["decoder"]["head_size"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return lm_session(folder / "model.onnx").run(["logits"], prefill_feeds(graph, ids, head))[0][0]


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory):
    return _text(tmp_path_factory.mktemp("text") / "calibration.txt", seed=1)


@pytest.fixture(scope="module")
def held_out_text(tmp_path_factory):
    return _text(tmp_path_factory.mktemp("text") / "held_out.txt", seed=2, words=1200)


@pytest.fixture(scope="module")
def quantized_pair(exported, calibration_text, tmp_path_factory):
    """The all-4-bit folder and a mixed 4/8-bit one under a budget between all-4-bit and all-8-bit."""
    from dlopt.api import lm_quantize_config, quantize_lm

    base = tmp_path_factory.mktemp("lm4")
    four = quantize_lm(exported, base / "four", lm_quantize_config(), calibration_text)
    budget = round(four["bytes_after"] / 1e6 + 0.03, 3)  # room for a layer or two at 8 bits, not for all
    result = CliRunner().invoke(main, ["quantize", str(exported), "--precision", "int4", "-o", str(base / "mixed"),
                                       "--calibration", str(calibration_text), "--max-size", str(budget)])
    assert result.exit_code == 0, result.output
    mixed = json.loads((base / "mixed" / "quantize.json").read_text())
    return base / "four", four, base / "mixed", mixed, budget, result.output


def test_int4_lm_folder_is_4_bit_loads_in_genai_and_stays_close_to_fp32(exported, quantized_pair, held_out_text):
    import onnx

    folder, report, *_ = quantized_pair
    assert {"genai_config.json", "tokenizer.json", "model.onnx", "quantize.json"} <= {p.name for p in folder.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    # as an ordinary write leaves them: onnx writes model.onnx.data 0600, the staging folder is 0700
    assert {p.name: p.stat().st_mode & 0o777 for p in [folder, *folder.iterdir()]} == {
        p.name: (0o777 if p.is_dir() else 0o666) & ~umask for p in [folder, *folder.iterdir()]}
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulNBits") == 5 * LAYERS + 1  # qkv, o, gate, up, down; the head
    # no float weight MatMul is left: the fractional zero points' offsets are 4-bit rows appended to each
    # MatMulNBits, which reads its input with the block sums concatenated (one Concat per distinct input: qkv,
    # o, gate/up, down per layer, the head); the block sums are MatMuls with a 0/1 indicator (K = 64, 128 here)
    assert "Add" not in ops and report["float_matmuls"] == []
    assert report["offset_corrections"] == 5 * LAYERS + 1
    assert ops.count("Concat") == ops.count("MatMul") == 4 * LAYERS + 1
    assert all(n.name.endswith("__block_sums") for n in graph.graph.node if n.op_type == "MatMul")
    producers = {o: n for n in graph.graph.node for o in n.output}
    for node in graph.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            assert producers[node.input[0]].op_type == "Concat"
            k = attrs["K"] - attrs["K"] // (attrs["block_size"] + 1)  # K' = K + K/block (one stage)
            assert attrs["K"] == k + k // attrs["block_size"] and attrs["accuracy_level"] == 4
    assert {dict((a.name, a.i) for a in n.attribute)["bits"] for n in graph.graph.node
            if n.op_type == "MatMulNBits"} == {4}
    assert all(len(n.input) == 4 for n in graph.graph.node if n.op_type == "MatMulNBits")  # asymmetric: zero points
    assert report["algorithm"] == "gptq" and report["block_size"] in (32, 64)
    assert set(report["measured"]["block_size_perplexity_rtn"]) == {"32", "64"}  # K = 64, 128: 128 does not divide
    assert report["layers_8bit"] == {} and report["bytes_after"] < 0.45 * report["bytes_before"]  # fp32 table: 77 of 194 kB
    assert len(report["genai_greedy_check"]) == 8  # onnxruntime-genai loaded it and generated
    # logits against fp32 on held-out text, prefill of 64 tokens: 4-bit weights of a random 64-wide model move
    # logits by a few % of their range; measured cosine 0.99+, argmax agreement 0.8+
    from dlopt.lm import read_text_tokens

    ids = read_text_tokens(exported, held_out_text)[:64]
    ref, got = _prefill_logits(exported, ids), _prefill_logits(folder, ids)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.98, cosine
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) >= 0.7
    assert report["fidelity"]["perplexity_ratio"] < 1.05 and report["fidelity"]["next_token_agreement"] >= 0.7


def test_last_position_head_on_the_fp32_export_and_back(exported):
    """prune_to_last_position on the export's own graph (head: a plain MatMul): one Slice, [B, 1, V] logits equal
    to the last row of every position's (float rounding: the same kernels), and all_position_logits gives back
    the export's graph node for node; a graph whose head input feeds something else is left alone."""
    import onnx

    from dlopt.lm import all_position_logits, lm_session, prefill_feeds, prune_to_last_position, read_genai_config
    from dlopt.sessions import cpu_session

    graph = onnx.load(str(exported / "model.onnx"))
    pruned = onnx.ModelProto()
    pruned.CopyFrom(graph)
    assert prune_to_last_position(pruned)
    ops = [n.op_type for n in pruned.graph.node]
    assert len(ops) == len(graph.graph.node) + 1 and ops.count("Slice") == 1 + [n.op_type for n in graph.graph.node].count("Slice")
    head = read_genai_config(exported)["model"]["decoder"]["head_size"]
    ids = np.arange(3, 40)
    feeds = prefill_feeds(graph, ids, head)
    every = cpu_session(graph).run(["logits"], feeds)[0]
    last = cpu_session(pruned).run(["logits"], feeds)[0]
    assert every.shape[:2] == (1, ids.shape[0]) and last.shape == (1, 1, every.shape[-1])
    np.testing.assert_allclose(last[0, 0], every[0, -1], rtol=0, atol=1e-5 * np.abs(every).max())
    assert np.array_equal(lm_session(pruned).run(["logits"], feeds)[0], every)  # dlopt's sessions: every position
    back = all_position_logits(pruned)
    assert [(n.op_type, list(n.input), list(n.output)) for n in back.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in graph.graph.node
    ]
    assert back.graph.output == graph.graph.output
    # the head's input read by another node too (here: made a graph output): slicing it would change that
    shared = onnx.ModelProto()
    shared.CopyFrom(graph)
    producers = {o: n for n in shared.graph.node for o in n.output}
    shared.graph.output.append(onnx.helper.make_tensor_value_info(producers["logits"].input[0], onnx.TensorProto.FLOAT, None))
    assert not prune_to_last_position(shared)


def test_int4_lm_prefill_computes_the_head_for_the_last_position_only(quantized_pair, held_out_text, tmp_path):
    """quantize's graph feeds the LM head the last position only ([B, 1, V] logits, which onnxruntime-genai
    reads as a pruned head); dlopt's perplexity sessions restore every position's logits; genai's logits and
    greedy tokens are those of the same graph with every position's logits."""
    import shutil

    import onnx
    import onnxruntime_genai as og

    from dlopt.lm import LAST_POSITION_SLICE, all_position_logits, prune_to_last_position, read_text_tokens

    folder, report, *_ = quantized_pair
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert report["logits"] == "last position"
    (logits,) = [o for o in graph.graph.output if o.name == "logits"]
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1
    (cut,) = [n for n in graph.graph.node if n.op_type == "Slice"]
    producers = {o: n for n in graph.graph.node for o in n.output}
    head = producers["logits"]
    assert cut.name == LAST_POSITION_SLICE and producers[cut.input[0]].op_type == "SkipSimplifiedLayerNormalization"
    # the head's block sums read the sliced state: [x, S(x)] for one position
    assert producers[head.input[0]].op_type == "Concat" and producers[head.input[0]].input[0] == cut.output[0]
    assert not prune_to_last_position(graph)  # already pruned: unchanged
    full = all_position_logits(graph)
    assert "Slice" not in [n.op_type for n in full.graph.node] and len(full.graph.node) == len(graph.graph.node) - 1
    unpruned = tmp_path / "unpruned"
    shutil.copytree(folder, unpruned)
    onnx.save(full, str(unpruned / "model.onnx"))  # same external data file beside it

    ids = read_text_tokens(folder, held_out_text)[:48]
    every = _prefill_logits(folder, ids)  # lm_session: every position although the folder's graph is pruned
    assert every.shape[0] == 48 and np.array_equal(every, _prefill_logits(unpruned, ids))

    def genai(path):
        model = og.Model(str(path))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=48 + 12)
        generator = og.Generator(model, params)
        generator.append_tokens(ids[None].astype(np.int32))
        first = np.asarray(generator.get_output("logits"), dtype=np.float32)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return first, tokens

    (pruned_logits, pruned_tokens), (full_logits, full_tokens) = genai(folder), genai(unpruned)
    assert pruned_logits.shape == (1, 1, every.shape[-1]) and full_logits.shape == (1, 48, every.shape[-1])
    # the same kernels on one row vs 48 rows (int8 activation blocks are per row): equal to float rounding
    np.testing.assert_allclose(pruned_logits[0, 0], full_logits[0, -1], rtol=0, atol=1e-4 * np.abs(full_logits).max())
    np.testing.assert_allclose(pruned_logits[0, 0], every[-1], rtol=0, atol=1e-4 * np.abs(every).max())
    assert pruned_tokens == full_tokens and len(pruned_tokens) == 12


@pytest.mark.parametrize("k", [128, 1536])  # K/block = 4 and 48 block sums: within one appended block, and over two
def test_fractional_zero_points_on_the_fast_kernel_as_appended_offset_blocks(k):
    """Weights on a GGUF Q4_1 grid (w = d·q + m per block of 32 along K, any real m): MatMulNBits with uint4
    zero points and the offsets appended as 4-bit rows over the input's block sums gives x @ W within the
    offsets' rounding, which each residual stage cuts (3 stages: float rounding); integer zero points alone
    are off by half a step per block. One MatMulNBits, no float MatMul or Add."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dlopt.optimize.int4 import Int4WeightOnly
    from dlopt.optimize.int4.blocks import quantize_blocks_float
    from dlopt.optimize.int4.gptq import write_matmul_nbits
    from dlopt.optimize.quantize_lm import _integer_zero_points, append_offset_blocks
    from dlopt.sessions import cpu_session

    rng = np.random.default_rng(0)
    n, block = 48, 32
    d = rng.uniform(0.01, 0.05, (n, k // block, 1)).astype(np.float32)
    m = rng.uniform(-0.4, 0.0, (n, k // block, 1)).astype(np.float32)
    codes = rng.integers(0, 16, (n, k // block, block))
    codes[..., 0], codes[..., -1] = 0, 15  # Q4_1 puts each block's min on code 0 and its max on 15
    w = (d * codes + m).reshape(n, k).T.astype(np.float32)  # [K, N]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, n])],
                              [numpy_helper.from_array(w, "w")])
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    want = x @ w
    errors = {}
    for stages in (0, 1, 2, 3):  # 0: integer zero points only
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        q, s, z, offset = _integer_zero_points(*quantize_blocks_float(np.ascontiguousarray(w.T), block))
        model = write_matmul_nbits(model, {"mm"}, Int4WeightOnly(block_size=block, symmetric=False, accuracy_level=None),
                                  lambda node, wt: (q, s, z))
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        if stages:
            assert append_offset_blocks(model, {"mm": offset}, block, stages) == ["mm"]
            ops = [node.op_type for node in model.graph.node]
            if k == 128:  # the block sums by one MatMul with a 0/1 indicator, stages and padding included
                assert sorted(ops) == sorted(["MatMul", "Concat", "MatMulNBits"])
            else:  # K = 1536: the indicator would be over MAX_INDICATOR_BYTES; every stage but the last is padded
                padded = ["Pad"] if stages > 1 else []
                assert sorted(ops) == sorted(["Reshape", "ReduceSum", *padded, "Concat", "MatMulNBits"])
            (nbits,) = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
            per = -(-(k // block) // block) * block  # the block sums, rounded up to whole blocks
            assert {a.name: a.i for a in nbits.attribute}["K"] == k + (stages - 1) * per + k // block
        onnx.checker.check_model(model)
        got = cpu_session(model).run(None, {"x": x})[0]
        errors[stages] = float(np.abs(got - want).max() / np.abs(want).max())
    # measured (k 128 / 1536): integer zero points 0.21 / 0.19; stages 1: 9e-3 / 1.2e-2, 2: 3e-4 / 8e-4, 3: 5e-6 / 7e-5
    assert errors[0] > 0.1
    assert errors[1] < 0.03 and errors[2] < 2e-3 and errors[3] < 3e-4
    assert errors[0] > 5 * errors[1] > 5 * errors[2] > 2 * errors[3]


def test_q4_1_weights_with_a_tied_embedding_quantize_losslessly(tmp_path):
    """A tied LM head on a Q4_1 grid: the head's fractional zero points are appended to the head's codes and
    reach the embedding rows read through GatherBlockQuantized, so the 4-bit folder reproduces fp32 logits:
    to float rounding with 3 residual stages of the offsets, within their 4-bit rounding with the default 1."""
    import onnx

    from dlopt.api import lm_quantize_config, quantize_lm

    hf = build_tiny_llama(tmp_path / "hf", tied=True, q4_1_grid=True)
    result = CliRunner().invoke(main, ["export", str(hf), "--task", "text-generation", "-o", str(tmp_path / "lm")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "lm"), "--precision", "int4", "-o",
                                       str(tmp_path / "lm4"), "--accuracy-level", "0"])
    assert result.exit_code == 0, result.output
    quantize_lm(tmp_path / "lm", tmp_path / "lm4x3", lm_quantize_config(accuracy_level=0, offset_stages=3), None)
    ids = np.arange(5, 69)
    ref = _prefill_logits(tmp_path / "lm", ids)
    fp32_ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "lm" / "model.onnx"), load_external_data=False)
                       .graph.node)
    for folder, stages, bound in (("lm4", 1, 1e-2), ("lm4x3", 3, 1e-5)):  # measured 1.9e-3, 3.5e-7
        report = json.loads((tmp_path / folder / "quantize.json").read_text())
        assert report["embedding_tied_to_lm_head"] and report["offset_corrections"] == 5 * LAYERS + 1
        got = _prefill_logits(tmp_path / folder, ids)
        assert np.abs(got - ref).max() < bound * np.abs(ref).max(), (folder, np.abs(got - ref).max())
        assert np.array_equal(got.argmax(-1), ref.argmax(-1))
        ops = Counter(n.op_type for n in onnx.load(str(tmp_path / folder / "model.onnx"), load_external_data=False)
                      .graph.node)
        # the 11 weight MatMuls and the tied table's Transpose go; per distinct MatMul input (4 per layer and the
        # head's) MatMul (block sums: a 0/1 indicator) -> Concat; the embedding: GatherBlockQuantized over three
        # Reshapes of the head's codes, scales and zero points, then Slice + Gather [+ ReduceSum of the stages]
        # + Add; the head reads a Slice of the last position (prune_to_last_position)
        inputs = 4 * LAYERS + 1
        assert fp32_ops - ops == Counter({"MatMul": 11 - inputs, "Transpose": 1})
        assert ops - fp32_ops == Counter({
            "MatMulNBits": 5 * LAYERS + 1, "Concat": inputs, "ReduceSum": int(stages > 1), "Reshape": 3,
            "GatherBlockQuantized": 1, "Slice": 2, "Add": 1}) - Counter()


def test_mixed_precision_fits_the_budget_with_the_most_sensitive_layers_at_8_bit(quantized_pair):
    import onnx

    _, four, folder, mixed, budget, output = quantized_pair
    assert mixed["bytes_after"] <= budget * 1e6 < four["bytes_after"] + 40_000
    eight = mixed["layers_8bit"]
    assert eight, mixed  # the budget leaves room for at least one layer
    effects = mixed["layer_perplexity_effect_pct"]
    assert list(effects)[0] in eight  # the layer with the largest measured effect is among those kept at 8 bits
    for name, why in eight.items():
        assert why["perplexity_effect_pct"] == effects[name] > 0
        assert f"8-bit {name}" in output and "raise calibration perplexity by" in why["why"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    bits = {n.name.rsplit("_Q", 1)[0]: dict((a.name, a.i) for a in n.attribute)["bits"]
            for n in graph.graph.node if n.op_type == "MatMulNBits"}
    assert {n for n, b in bits.items() if b == 8} == set(mixed["matmuls_8bit"])
    assert all(m in bits for why in eight.values() for m in why["matmuls"])
    assert mixed["fidelity"]["perplexity_ratio"] <= four["fidelity"]["perplexity_ratio"] + 0.01


def test_int4_lm_budget_below_the_all_4_bit_model_is_exit_2(exported, calibration_text, tmp_path):
    result = CliRunner().invoke(main, ["quantize", str(exported), "--precision", "int4", "-o", str(tmp_path / "q"),
                                       "--calibration", str(calibration_text), "--max-size", "0.01"])
    assert result.exit_code == 2, result.output
    assert "over --max-size 0.01 MB" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args,message", [
    (["--precision", "int8"], "quantized to int4, not int8"),
    (["--precision", "int4", "--max-size", "1"], "measure perplexity on calibration text, and there is none"),
    (["--precision", "int4", "--calibration", "missing.txt"], "calibration text missing.txt does not exist"),
])
def test_int4_lm_bad_input_is_one_line_and_exit_2(exported, tmp_path, args, message):
    result = CliRunner().invoke(main, ["quantize", str(exported), "-o", str(tmp_path / "q"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "q").exists()


def test_eval_lm_row_perplexity_and_next_token_agreement(exported, quantized_pair, held_out_text, tmp_path):
    folder, report, *_ = quantized_pair
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(folder), "--reference", str(exported), "--data", str(held_out_text),
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {m["metric"]: m for m in json.loads(out.read_text())["metrics"]}
    assert set(rows) == {"perplexity", "perplexity_value", "next_token_agreement"}
    ratio, ppl = rows["perplexity"]["value"], rows["perplexity_value"]
    assert ratio == pytest.approx(ppl["value"] / ppl["reference"], rel=1e-6)
    assert 0.9 < ratio < 1.1 and 0.7 <= rows["next_token_agreement"]["value"] <= 1.0
    same = CliRunner().invoke(main, ["eval", str(exported), "--reference", str(exported), "--data",
                                     str(held_out_text), "--json", str(tmp_path / "same.json")])
    rows = {m["metric"]: m for m in json.loads((tmp_path / "same.json").read_text())["metrics"]}
    assert same.exit_code == 0 and rows["perplexity"]["value"] == 1.0 and rows["next_token_agreement"]["value"] == 1.0
    missing = CliRunner().invoke(main, ["eval", str(folder), "--data", str(held_out_text)])
    assert missing.exit_code == 2 and "needs its FP32 export as --reference" in missing.output


@pytest.mark.heavy
def test_smollm2_int4_keeps_perplexity_under_100_mb(tmp_path):
    """SmolLM2-135M (its "FP32" weights are the packaged Q4_1 GGUF dequantized; the tied head/embedding is
    Q8_0): dlopt quantize --precision int4 --max-size 100 on the verified fp32 export, calibrated on
    lee_background.cor after the evaluated tokens; perplexity on the first 2,048 tokens (held out) within
    3 % of the fp32 export's, the folder under 100 MB and loadable by onnxruntime-genai."""
    from dlopt.models import smollm2

    tokenizer = smollm2.tokenizer()
    tokens = smollm2._tokens("lee_background.cor")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(tokenizer.decode(tokens[smollm2.MAX_TOKENS:].tolist()))
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(tokenizer.decode(tokens[:2048].tolist()))
    lm, lm4 = tmp_path / "lm", tmp_path / "lm4"
    result = CliRunner().invoke(main, ["export", "smollm2", "--task", "text-generation", "-o", str(lm)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["quantize", str(lm), "--precision", "int4", "-o", str(lm4), "--calibration",
                                       str(calibration), "--max-size", "100"])
    assert result.exit_code == 0, result.output
    report = json.loads((lm4 / "quantize.json").read_text())
    assert report["bytes_after"] <= 100e6 and report["block_size"] == 32  # the GGUF's own block: measured best
    assert report["offset_corrections"] == report["matmuls_4bit"]
    result = CliRunner().invoke(main, ["eval", str(lm4), "--reference", str(lm), "--data", str(held_out), "--json",
                                       str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    rows = {m["metric"]: m["value"] for m in json.loads((tmp_path / "eval.json").read_text())["metrics"]}
    assert rows["perplexity"] <= 1.03 and rows["next_token_agreement"] >= 0.85



def test_int4_lm_head_rung_under_a_budget_too_small_for_an_8_bit_head(calibration_text, tmp_path):
    """The LM head's rungs under --max-size: 8-bit > 4-bit in blocks of 16 > 4-bit in the model's blocks. A budget
    with room for the tied head in blocks of 16 but not at 8 bits gets the finer head, and the embedding reads
    the same codes (GatherBlockQuantized in blocks of 16); with no room for either the head stays as it was.
    The budgets are set against the all-4-bit model's written size: the ladder's estimate leaves out the new
    graph nodes (~17 kB here), so the all-4-bit graph is built and measured first and the ladder runs on the
    corrected estimate; the chosen graph is measured too. Below the all-4-bit size: an input error."""
    import onnx

    from dlopt.lm import lm_session, prefill_feeds, read_genai_config
    from dlopt.errors import InputError
    from dlopt.optimize.quantize_lm import QuantizeLm, quantize_lm_model, read_calibration, serialized_bytes

    hf = build_tiny_llama(tmp_path / "hf", tied=True)
    result = CliRunner().invoke(main, ["export", str(hf), "--task", "text-generation", "-o", str(tmp_path / "lm")])
    assert result.exit_code == 0, result.output
    head = read_genai_config(tmp_path / "lm")["model"]["decoder"]["head_size"]
    source = onnx.load(str(tmp_path / "lm" / "model.onnx"))
    tokens = read_calibration(tmp_path / "lm", calibration_text)
    models, reports = {}, {}
    models["four"], reports["four"] = quantize_lm_model(source, QuantizeLm(), tokens, head)
    estimate = reports["four"]["measured"]["size_estimate_mb"]["all_4bit"] * 1e6
    built = serialized_bytes(models["four"])
    assert estimate + 5_000 < built < estimate + 40_000  # the nodes the estimate leaves out
    # the head [64, ~300]: 4-bit b32 with its offset rows ~18.6 kB; estimated, in blocks of 16 ~0.3 kB more and
    # 8-bit ~1.8 kB more. Built, blocks of 16 take ~1.4 kB more (their offset rows and block sums' nodes): with
    # 1 kB of room the ladder picks them, measures the built graph over the budget and rebuilds one rung lower
    def under(label, room):
        config = QuantizeLm(max_size_mb=(built + room) / 1e6)
        models[label], reports[label] = quantize_lm_model(source, config, tokens, head)
        sizes = reports[label]["measured"]["size_estimate_mb"]
        assert serialized_bytes(models[label]) == round(sizes["built"] * 1e6) <= built + room, sizes
        assert sizes["all_4bit_built"] * 1e6 == built and sizes["chosen"] * 1e6 <= built + room, sizes
        assert "/lm_head/MatMul" not in reports[label]["matmuls_8bit"]
        return sizes

    rebuilt = under("rebuilt", 1_000)
    assert len(rebuilt["rebuilt_over"]) == 1 and rebuilt["rebuilt_over"][0] * 1e6 > built + 1_000, rebuilt
    assert reports["rebuilt"]["lm_head"]["form"] == "4-bit blocks of 32" and rebuilt["built"] * 1e6 == built
    fine_room = round(rebuilt["rebuilt_over"][0] * 1e6) - built + 100  # what blocks of 16 take, built
    assert "rebuilt_over" not in under("fine", fine_room) and "rebuilt_over" not in under("none", 100)
    with pytest.raises(InputError, match="the all-4-bit model is .* over --max-size") as refused:
        quantize_lm_model(source, QuantizeLm(max_size_mb=(built - 100) / 1e6), tokens, head)
    assert refused.value.hint == f"raise --max-size to at least {math.ceil(built / 1e4) / 100:g}"
    four, fine, none = reports["four"], reports["fine"], reports["none"]
    assert four["lm_head"] == {} and four["block_size"] == 32
    assert fine["lm_head"]["form"] == "4-bit blocks of 16", fine["lm_head"]
    effects, extra = fine["lm_head"]["perplexity_effect_pct"], fine["lm_head"]["extra_mb"]
    assert effects["4-bit b16"] < effects["4-bit b32"] and 0 < extra["4-bit b16"] < 0.001 < extra["8-bit"]
    assert f"(+{extra['4-bit b16']:.3g} MB)" in fine["lm_head"]["why"], fine["lm_head"]["why"]  # what it adds, not 0
    assert none["lm_head"]["form"] == "4-bit blocks of 32" and "fits the budget" in none["lm_head"]["why"]
    sizes = {n.op_type + ("/head" if "lm_head" in n.name else ""): dict((a.name, a.i) for a in n.attribute)["block_size"]
             for n in models["fine"].graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert sizes == {"MatMulNBits": 32, "MatMulNBits/head": 16, "GatherBlockQuantized": 16}, sizes
    # the finer head against fp32: logits close, greedy choices as often the same as the b32 head's or more,
    # held-out perplexity (quantize's own held-out windows) no worse
    ids = np.arange(5, 69)
    feeds = prefill_feeds(source, ids, head)
    ref = lm_session(source).run(["logits"], feeds)[0][0]
    got = {label: lm_session(models[label]).run(["logits"], feeds)[0][0] for label in ("four", "fine")}
    errors = {label: float(np.abs(x - ref).max() / np.abs(ref).max()) for label, x in got.items()}
    agree = {label: float(np.mean(x.argmax(-1) == ref.argmax(-1))) for label, x in got.items()}
    assert errors["fine"] < 0.1 and agree["fine"] >= agree["four"] - 1 / 64 and agree["fine"] > 0.8, (errors, agree)
    assert fine["fidelity"]["perplexity_ratio"] <= four["fidelity"]["perplexity_ratio"] + 0.005


@pytest.mark.parametrize("size", [8, 24])
def test_int4_lm_head_block_size_must_be_a_power_of_two_from_16(size):
    from dlopt.api import lm_quantize_config
    from dlopt.errors import InputError

    with pytest.raises(InputError, match=f"head block size must be a power of two >= 16, got {size}"):
        lm_quantize_config(head_block_size=size)
    assert lm_quantize_config(head_block_size=None).head_block_size is None
