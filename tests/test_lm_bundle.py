"""Runnable LM bundles: `dlopt package LM_FOLDER/` (the folder onnxruntime-genai loads as it is, sample
prompts and their greedy outputs in the manifest, a README whose chat code runs) and `dlopt verify`
re-generating those outputs; bad LM input is exit 2 and one line.

The tiny random Llama of test_llm (2 layers, a 300-token BPE), given a chat template, exported once."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib.resources import files

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from test_llm import TEXT, build_tiny_llama  # noqa: E402

from dlopt.cli import main  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def lm(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "lm"
    result = CliRunner().invoke(main, ["export", str(tiny), "--task", "text-generation", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    result = CliRunner().invoke(main, ["keygen", "-o", str(folder)])
    assert result.exit_code == 0, result.output
    return folder / "dlopt-signing.key", folder / "dlopt-signing.pub"


@pytest.fixture(scope="module")
def bundle(lm, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "lm-cpu"
    result = CliRunner().invoke(main, ["package", str(lm), "--target", "cpu", "--reference", str(lm), "-o", str(out),
                                       "--prompt", "the quick brown fox", "--prompt", "each new token reads",
                                       "--sign-key", str(keys[0]), "--measure", "1"])
    assert result.exit_code == 0, result.output
    assert "= reference" in result.output and "decode" in result.output
    return out


def _greedy(folder, prompt_ids, new_tokens):
    """The folder's greedy continuation, generated here independently of dlopt."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def test_bundle_is_the_genai_folder_with_samples_in_its_manifest(lm, bundle, keys):
    import onnxruntime_genai as og

    names = {p.name for p in bundle.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "manifest.json", "manifest.sig"} <= names
    manifest = json.loads((bundle / "manifest.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(manifest, json.loads(files("dlopt").joinpath("schemas/manifest.schema.json").read_text()))
    assert manifest["model"]["format"] == "genai" and manifest["target"] == "cpu"
    roles = {f["path"]: f["role"] for f in manifest["files"]}
    assert roles["model.onnx"] == "model" and roles["tokenizer.json"] == "tokenizer"
    assert roles["genai_config.json"] == "genai-config" and roles["model.onnx.data"] == "model-data"
    assert manifest["configs"]["stages"]["export"]["report"] == "export.json"
    g = manifest["generation"]
    assert [s["prompt"] for s in g["samples"]] == ["the quick brown fox", "each new token reads"]
    tokenizer = og.Tokenizer(og.Model(str(bundle)))
    for s in g["samples"]:
        assert s["prompt_tokens"] == tokenizer.encode(s["prompt"]).tolist()
        assert len(s["tokens"]) == 20 and s["stopped"] == "length"
        # the recorded output is the source folder's own greedy continuation, generated independently
        assert s["tokens"] == _greedy(lm, s["prompt_tokens"], 20)
        assert s["text"] == tokenizer.decode(s["tokens"])
        assert s["reference"] == {"tokens": s["tokens"], "equal_prefix": 20, "equal": True,
                                  "logit_gap_where_they_part": None}
    assert all(c["passed"] and c["equal"] == 20 for c in manifest["verification"]["checks"])
    speed = manifest["metrics"]["cpu-genai"]
    assert speed["decode_tokens_per_s"] > 0 and speed["prefill_ms"] > 0
    ratio = speed["ratio_to_reference"]["decode_per_token"]
    assert ratio["low"] <= ratio["estimate"] <= ratio["high"]
    assert manifest["signature"]["key_fingerprint"]
    result = CliRunner().invoke(main, ["verify", str(bundle), "--trusted-key", str(keys[1])])
    assert result.exit_code == 0, result.output
    assert "greedy tokens of sample 2" in result.output and "signed by the trusted key" in result.output


def _last_logits(folder, ids):
    """The folder's logits for the next token after `ids`, read here independently of dlopt."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    return np.asarray(generator.get_output("logits"), dtype=np.float32)[0, -1]


@pytest.fixture(scope="module")
def int4(lm, tmp_path_factory):
    """The tiny export quantized to 4 bits (its quantize.json names `lm` as the source)."""
    from dlopt.api import lm_quantize_config, quantize_lm

    base = tmp_path_factory.mktemp("lm4")
    words = " ".join(TEXT).split()
    text = base / "calibration.txt"
    text.write_text(" ".join(np.random.default_rng(1).choice(words, size=2500)) + "\n", encoding="utf-8")
    quantize_lm(lm, base / "lm4", lm_quantize_config(), text)
    return base / "lm4"


def test_quantized_bundle_compares_with_the_fp32_export_it_was_made_from(lm, int4, tmp_path):
    """Without --reference, a quantized folder's bundle generates with the FP32 export its quantize.json names,
    and records per sample the reference's tokens, how many first tokens agree and, where they part, the
    reference's logit gap between its own token and the bundle's (all checked here against onnxruntime-genai)."""
    out = tmp_path / "lm4-cpu"
    prompts = ["the quick brown fox", "each new token reads", "a small language model", "of every token before"]
    result = CliRunner().invoke(main, ["package", str(int4), "--target", "cpu", "--measure", "0", "-o", str(out),
                                       *[a for p in prompts for a in ("--prompt", p)]])
    assert result.exit_code == 0, result.output
    assert "= reference" in result.output
    g = json.loads((out / "manifest.json").read_text())["generation"]
    assert g["reference"]["folder"] == "lm"
    parted = 0  # the tiny int4 parts from its FP32 export on 3 of the 4 prompts here
    for s in g["samples"]:
        ref = _greedy(lm, s["prompt_tokens"], 20)
        assert s["tokens"] == _greedy(int4, s["prompt_tokens"], 20) and s["reference"]["tokens"] == ref
        same = next((k for k, (a, b) in enumerate(zip(ref, s["tokens"])) if a != b), 20)
        assert s["reference"]["equal_prefix"] == same and s["reference"]["equal"] == (same == 20)
        gap = s["reference"]["logit_gap_where_they_part"]
        if same == 20:
            assert gap is None
        else:
            parted += 1
            logits = _last_logits(lm, s["prompt_tokens"] + ref[:same])
            assert gap == pytest.approx(logits[ref[same]] - logits[s["tokens"][same]], abs=1e-3) and gap >= 0
    assert parted > 0  # else the gap went unchecked
    total = sum(s["reference"]["equal_prefix"] for s in g["samples"])
    assert f"Agreement with the reference: {total} of {sum(len(s['tokens']) for s in g['samples'])}" in (
        out / "README.md").read_text()
    result = CliRunner().invoke(main, ["verify", str(out)])  # re-checks the bundle's tokens, restates the agreement
    assert result.exit_code == 0, result.output
    counts = ", ".join(f"{s['reference']['equal_prefix']}/{len(s['tokens'])}" for s in g["samples"])
    assert f"first tokens equal to the reference lm/'s, per sample: {counts} (recorded" in result.output


def test_readme_chat_code_runs_as_written(bundle, tmp_path):
    """The README's Python, run exactly as written from the bundle's parent folder, chats: its reply is
    the chat template's prompt continued greedily (genai_config's search defaults), as generated here."""
    import onnxruntime_genai as og

    readme = (bundle / "README.md").read_text()
    code, = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len([line for line in code.splitlines() if line.strip()]) <= 16 and "apply_chat_template" in code
    done = subprocess.run([sys.executable, "-c", code], input="the quick brown fox\n\n", capture_output=True, text=True,
                          cwd=bundle.parent, timeout=120)
    assert done.returncode == 0, done.stderr
    model = og.Model(str(bundle))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "the quick brown fox"}]),
                                           add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=min(len(ids) + 256, 256))  # the README's cap, within the context
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert len(tokens) > 0
    stream = tokenizer.create_stream()  # byte-level pieces: decoded as a stream, as the chat prints them
    assert done.stdout == "> " + "".join(stream.decode(t) for t in tokens) + "\n> "


def test_verify_regenerates_the_samples_and_fails_on_a_changed_token(bundle, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(bundle, changed)
    (changed / "manifest.sig").unlink()
    manifest = json.loads((changed / "manifest.json").read_text())
    tokens = manifest["generation"]["samples"][1]["tokens"]
    tokens[5] = (tokens[5] + 1) % 300  # the manifest now claims another 6th token
    (changed / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(changed)])
    assert result.exit_code == 1, result.output
    assert "greedy tokens of sample 2" in result.output and "token 6: the model's greedy choice" in result.output
    assert "Traceback" not in result.output


def test_verify_fails_when_the_weights_change(bundle, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(bundle, changed)
    data = bytearray((changed / "model.onnx.data").read_bytes())
    data[1000:1004] = b"\x00\x00\x80\x7f"  # one weight becomes inf
    (changed / "model.onnx.data").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(changed)])
    assert result.exit_code == 1 and "model.onnx.data: changed" in result.output


def _executorch_or_skip():
    from dlopt.targets.xnnpack import executorch_status

    ok, reason = executorch_status()
    if not ok:
        pytest.skip(reason)


def test_mobile_bundle_holds_a_verified_executorch_program(lm, tiny, tmp_path):
    """--target mobile: the genai folder plus the model lowered to an XNNPACK .pte from the Hugging Face folder
    export.json names; its greedy tokens for the samples are recorded, equal the ONNX decoder's (fp32 both),
    timed, and re-checked by verify, which fails when a recorded token changes."""
    _executorch_or_skip()
    out = tmp_path / "lm-mobile"
    result = CliRunner().invoke(main, ["package", str(lm), "--target", "mobile", "-o", str(out), "--measure", "0.5",
                                       "--new-tokens", "8", "--prompt", "the quick brown fox"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "mobile" and manifest["generation"]["new_tokens"] == 8
    assert manifest["generation"]["executorch"].startswith("measured here: model.xnnpack-fp32.pte")
    (program,) = manifest["artifacts"]
    assert program["file"] == "model.xnnpack-fp32.pte" and program["backend"] == "xnnpack"
    assert program["torch_source"] == str(tiny.resolve()) and program["xnnpack_delegates"] > 0
    assert {f["path"]: f["role"] for f in manifest["files"]}["model.xnnpack-fp32.pte"] == "executorch-program"
    (sample,) = manifest["generation"]["samples"]
    assert program["samples"][0]["tokens"] == sample["tokens"]  # fp32 .pte = fp32 ONNX decoder, token for token
    assert program["samples"][0]["equal_prefix_to_decoder"] == 8
    assert program["metrics"]["decode_tokens_per_s"] > 0 and program["metrics"]["prefill_ms"] > 0
    assert "## ExecuTorch (XNNPACK)" in (out / "README.md").read_text()
    assert {"tokenizer.json", "model.xnnpack-fp32.pte"} <= {p.name for p in out.iterdir()}
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    assert "model.xnnpack-fp32.pte" in result.output
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    manifest["artifacts"][0]["samples"][0]["tokens"][4] = (sample["tokens"][4] + 1) % 300
    (changed / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(changed)])
    assert result.exit_code == 1 and "model.xnnpack-fp32.pte" in result.output, result.output


def test_mobile_bundle_without_executorch_is_one_line_and_exit_2(lm, tmp_path, monkeypatch):
    import dlopt.targets.xnnpack as xnnpack

    monkeypatch.setattr(xnnpack, "executorch_status", lambda: (False, "ExecuTorch is not installed (test)"))
    out = tmp_path / "lm-mobile"
    result = CliRunner().invoke(main, ["package", str(lm), "--target", "mobile", "-o", str(out), "--measure", "0"])
    assert result.exit_code == 2 and "needs ExecuTorch: ExecuTorch is not installed (test)" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_mobile_bundle_refuses_a_cnn_pte_precision(lm, tmp_path):
    result = CliRunner().invoke(main, ["package", str(lm), "--target", "mobile", "-o", str(tmp_path / "b"),
                                       "--measure", "0", "--pte", "int8"])
    assert result.exit_code == 2 and ".pte precision int8 is not for an LM" in result.output, result.output


def _bad_lm_folders(tiny, lm, tmp_path):
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(lm, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    bert = tmp_path / "bert"
    import transformers

    transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(bert)
    return {"no_tokenizer": no_tokenizer, "bert": bert, "hf": tiny}


@pytest.mark.parametrize("case,args,message", [
    ("no_tokenizer", [], "has no tokenizer (tokenizer.json or tokenizer.model)"),
    ("bert", [], "describes model_type 'bert', not a causal language model"),
    ("hf", [], "is a Hugging Face model folder, not an exported LM"),
    ("lm", ["--new-tokens", "0"], "new tokens must be at least 1, got 0"),
    ("lm", ["--new-tokens", "-2"], "new tokens must be at least 1, got -2"),
    ("lm", ["--prompt", "the quick brown fox " * 80], "exceeds the context"),
])
def test_package_bad_lm_input_is_one_line_and_exit_2(tiny, lm, tmp_path, case, args, message):
    source = lm if case == "lm" else _bad_lm_folders(tiny, lm, tmp_path)[case]
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["package", str(source), "--target", "cpu", "-o", str(out), "--measure", "0",
                                       *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) <= 2  # message + hint
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []


# --------------------------------------------------------------------------- gate: decode tokens/s, perplexity

def _perturbed(lm, out, scale: float):
    """A copy of the export whose float weights carry seeded noise: the same graph and speed, another model."""
    shutil.copytree(lm, out)
    weights = np.frombuffer((out / "model.onnx.data").read_bytes(), dtype=np.float32).copy()
    rng = np.random.default_rng(0)
    weights += (scale * weights.std() * rng.standard_normal(weights.shape)).astype(np.float32)
    (out / "model.onnx.data").write_bytes(weights.tobytes())
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from test_llm import TEXT

    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(" ".join(TEXT * 3))
    return path


def test_gate_lm_passes_on_perplexity_and_decode_speed(tiny, lm, text, tmp_path):
    import onnxruntime_genai as og
    import torch
    import transformers

    report = tmp_path / "gate.json"
    result = CliRunner().invoke(main, ["gate", "--baseline", str(lm), "--candidate", str(lm), "--max-slowdown", "50%",
                                       "--eval-data", str(text), "--max-accuracy-drop", "perplexity=0.01",
                                       "--budget", "6s", "--new-tokens", "8", "--prompt-len", "16", "--json",
                                       str(report), "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    checks = {c["name"]: c for c in data["checks"]}
    speed, ppl = checks["decode tokens/s"], checks["accuracy: perplexity"]
    assert speed["verdict"] == "pass" and speed["baseline"] > 0 and speed["candidate"] > 0
    assert ppl["verdict"] == "pass" and ppl["change"].startswith("drop +0 ")
    # the baseline's perplexity is transformers' on the same tokens (256-token windows: the context)
    ids = og.Tokenizer(og.Model(str(lm))).encode(text.read_text()).tolist()
    windows = len(ids) // 256
    assert windows >= 2
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for k in range(windows):
            window = torch.tensor([ids[k * 256:(k + 1) * 256]], dtype=torch.long)
            losses.append(float(model(input_ids=window, labels=window).loss))  # mean NLL of 255 next tokens
    assert ppl["baseline"] == pytest.approx(float(np.exp(np.mean(losses))), rel=1e-4)
    assert f"{windows * 255} tokens in 256-token windows" in ppl["detail"]


def test_gate_lm_fails_on_a_perplexity_rise(lm, text, tmp_path):
    noisy = _perturbed(lm, tmp_path / "noisy", 0.3)
    result = CliRunner().invoke(main, ["gate", "--baseline", str(lm), "--candidate", str(noisy),
                                       "--max-slowdown", "50%", "--eval-data", str(text), "--max-accuracy-drop", "0.01",
                                       "--budget", "4s",
                                       "--new-tokens", "8", "--prompt-len", "16", "--no-progress",
                                       "--on-inconclusive", "pass"])
    assert result.exit_code == 1, result.output
    line, = [ln for ln in result.output.splitlines() if ln.startswith("accuracy: perplexity ")]
    assert line.split()[2] == "FAIL" and "drop <= 0.01" in line
    speed, = [ln for ln in result.output.splitlines() if ln.startswith("decode tokens/s ")]
    assert speed.split()[2] == "PASS"  # the same graph and kernels: only the weights changed


@pytest.mark.parametrize("args,message", [
    (["--new-tokens", "0"], "new tokens must be at least 1, got 0"),
    (["--new-tokens", "-1"], "new tokens must be at least 1, got -1"),
    (["--prompt-len", "300"], "exceeds the context"),
    (["--max-accuracy-drop", "perplexity=0.01"], "a perplexity limit needs evaluation text"),
    (["--eval-data", "x.npz", "--max-accuracy-drop", "top1=0.01"], "an LM gate measures perplexity, not top1"),
])
def test_gate_lm_bad_input_is_exit_2(lm, tmp_path, args, message):
    result = CliRunner().invoke(main, ["gate", "--baseline", str(lm), "--candidate", str(lm), "--budget", "2s",
                                       "--no-progress", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bench_generate_names_a_bert_folder(tiny, lm, tmp_path):
    bert = _bad_lm_folders(tiny, lm, tmp_path)["bert"]
    result = CliRunner().invoke(main, ["bench", str(bert), "--generate", "--no-progress"])
    assert result.exit_code == 2 and "not a causal language model" in result.output


@pytest.mark.heavy
def test_smollm2_bundle_generates_its_samples_and_verifies(tmp_path):
    """SmolLM2-135M: exported, packaged with its FP32 export as the reference, verified; the chat code runs."""
    lm_dir = tmp_path / "lm"
    result = CliRunner().invoke(main, ["export", "smollm2", "--task", "text-generation", "-o", str(lm_dir)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "smollm2-cpu"
    result = CliRunner().invoke(main, ["package", str(lm_dir), "--target", "cpu", "--reference", str(lm_dir),
                                       "-o", str(out), "--measure", "5"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["chat_template"]
    for s in manifest["generation"]["samples"]:
        assert len(s["tokens"]) == 20 and s["reference"]["equal_prefix"] == 20
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    code, = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), flags=re.S)
    done = subprocess.run([sys.executable, "-c", code], input="What is the capital of France?\n\n",
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0 and len(done.stdout.strip()) > 10, done.stdout + done.stderr
