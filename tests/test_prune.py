"""dlopt.optimize.prune: pruned shapes, the output layer untouched, honest unstructured reports, bad input."""

import gzip
import re

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
nn = torch.nn
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from dlopt.errors import InputError  # noqa: E402
from dlopt.checkpoint import read_checkpoint, rebuild, save_checkpoint  # noqa: E402
from dlopt.optimize.prune import Prune, find_attention, output_layer_name, prune  # noqa: E402


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(64, 10)

    def forward(self, image):
        return self.classifier(self.features(image))


def tiny_cnn():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    for m in model.modules():  # non-trivial BN statistics so that pruning choices matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, {"image": torch.randn(2, 1, 16, 16)}


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1, 100, (2, 12))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class TorchEncoder(nn.Module):
    """The stock nn.TransformerEncoder: q/k/v packed in nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_channel_pruning_halves_conv_widths_and_keeps_the_classifier():
    model, inputs = tiny_cnn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune(model, inputs, Prune(ratio=0.5))
    pruned = result.model
    convs = [m for m in pruned.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]
    assert [c.in_channels for c in convs] == [1, 8, 16]
    assert [m.num_features for m in pruned.features if isinstance(m, nn.BatchNorm2d)] == [8, 16, 32]
    # the classifier keeps its 10 classes, its bias, and a subset of its weight columns
    assert result.report["output_layer"] == "classifier"
    assert pruned.classifier.out_features == 10 and pruned.classifier.in_features == 32
    torch.testing.assert_close(pruned.classifier.bias, before["classifier.bias"], rtol=0, atol=0)
    kept = [int(np.argmin(((before["classifier.weight"].T - col) ** 2).sum(1).numpy()))
            for col in pruned.classifier.weight.detach().T]
    torch.testing.assert_close(pruned.classifier.weight, before["classifier.weight"][:, kept], rtol=0, atol=0)
    assert len(set(kept)) == 32
    # the input model is untouched; the output shape is the same
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert pruned(**inputs).shape == (2, 10)
    r = result.report
    assert r["structure"] == "channels"
    assert r["parameters_after"] < 0.3 * r["parameters_before"]
    assert 0.2 < r["macs_after"] / r["macs_before"] < 0.35  # ~(1/2)^2 for conv-conv layers
    assert {c["layer"] for c in r["changed_layers"]} >= {"features.0", "features.4", "features.8", "classifier"}


def test_magnitude_importance_keeps_the_largest_filters():
    model, inputs = tiny_cnn()
    first = model.features[0]
    with torch.no_grad():
        first.weight[:8].mul_(10.0)  # filters 0-7 are now by far the largest
        model.features[1].weight[:8].mul_(10.0)  # and so are their BN scales
    pruned = prune(model, inputs, Prune(ratio=0.5, importance="magnitude")).model
    torch.testing.assert_close(pruned.features[0].weight, first.weight[:8], rtol=0, atol=0)


def test_ignore_keeps_the_named_layers_width():
    model, inputs = tiny_cnn()
    result = prune(model, inputs, Prune(ratio=0.5, ignore=("features.4",)))
    convs = [m for m in result.model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 32, 32]
    assert result.report["ignored"] == ["features.4"]


def test_global_pruning_reaches_the_overall_ratio_with_uneven_widths():
    model, inputs = tiny_cnn()
    pruned = prune(model, inputs, Prune(ratio=0.5, global_pruning=True)).model
    widths = [m.out_channels for m in pruned.features if isinstance(m, nn.Conv2d)]
    assert sum(widths) == (16 + 32 + 64) // 2
    assert widths != [8, 16, 32]  # ranked across layers, not half of each


def test_taylor_importance_uses_gradients():
    model, inputs = tiny_cnn()
    batches = [({"image": torch.randn(8, 1, 16, 16)}, torch.randint(0, 10, (8,))) for _ in range(2)]
    result = prune(model, inputs, Prune(ratio=0.5, importance="taylor"), gradient_batches=batches)
    assert [m.out_channels for m in result.model.features if isinstance(m, nn.Conv2d)] == [8, 16, 32]
    assert all(p.grad is None for p in result.model.parameters())
    with pytest.raises(InputError, match="taylor.*needs data"):
        prune(model, inputs, Prune(ratio=0.5, importance="taylor"))


def test_head_and_ffn_pruning_of_a_bert_updates_the_head_count():
    model, inputs = tiny_bert()
    result = prune(model, inputs, Prune(ratio=0.5))  # auto: heads + FFN for transformers
    pruned = result.model
    assert result.report["structure"] == "heads+ffn"
    for layer in pruned.encoder.layer:
        attn = layer.attention.self
        assert attn.num_attention_heads == 2 and attn.all_head_size == 32
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features == 32
        assert attn.query.in_features == 64  # head dims and the hidden width are kept
        assert layer.attention.output.dense.weight.shape == (64, 32)
        assert layer.intermediate.dense.out_features == 64 and layer.output.dense.in_features == 64
        assert layer.output.dense.out_features == 64
    assert result.report["attention_heads"]["encoder.layer.0.attention.self"] == {"before": 4, "after": 2}
    out = pruned(**inputs).last_hidden_state
    assert out.shape == (2, 12, 64) and torch.isfinite(out).all()


def test_heads_only_and_ffn_only():
    model, inputs = tiny_bert()
    heads = prune(model, inputs, Prune(ratio=0.5, structure="heads")).model
    assert heads.encoder.layer[0].attention.self.num_attention_heads == 2
    assert heads.encoder.layer[0].intermediate.dense.out_features == 128
    ffn = prune(model, inputs, Prune(ratio=0.5, structure="ffn")).model
    assert ffn.encoder.layer[0].attention.self.num_attention_heads == 4
    assert ffn.encoder.layer[0].intermediate.dense.out_features == 64


def test_stock_transformer_encoder_gets_only_its_ffn_pruned():
    torch.manual_seed(0)
    model = TorchEncoder().eval()
    inputs = {"x": torch.randn(2, 5, 32)}
    result = prune(model, inputs, Prune(ratio=0.5))
    assert result.report["structure"] == "ffn"
    for layer in result.model.encoder.layers:
        assert layer.linear1.out_features == 32 and layer.linear2.in_features == 32
        assert layer.self_attn.embed_dim == 32 and layer.self_attn.num_heads == 4
    assert result.model(**inputs).shape == (2, 3)
    with pytest.raises(InputError, match="no attention module with separate q/k/v"):
        prune(model, inputs, Prune(ratio=0.5, structure="heads"))


def test_checkpoint_replays_the_pruning_on_a_fresh_model(tmp_path):
    model, inputs = tiny_bert()
    result = prune(model, inputs, Prune(ratio=0.5))
    path = save_checkpoint(tmp_path / "pruned.pt", result.model, "tiny-bert", result.report)
    checkpoint = read_checkpoint(path)
    fresh, _ = tiny_bert()
    rebuilt = rebuild(checkpoint, fresh, inputs)
    assert rebuilt.encoder.layer[1].attention.self.num_attention_heads == 2
    torch.testing.assert_close(rebuilt(**inputs).last_hidden_state, result.model(**inputs).last_hidden_state,
                               rtol=0, atol=0)


def test_unstructured_reports_sparsity_and_size_but_no_speedup():
    model, inputs = tiny_cnn()
    result = prune(model, inputs, Prune(ratio=0.6, structure="unstructured"))
    r = result.report
    assert r["speedup_claim"] is None and "same speed" in r["note"]
    assert r["sparsity_pruned_layers"] == pytest.approx(0.6, abs=0.002)
    assert r["parameters_after"] == r["parameters_before"] and r["macs_after"] == r["macs_before"]
    assert r["changed_layers"] == []  # no shape changes
    assert r["gzip_bytes_after"] < 0.8 * r["gzip_bytes_before"]
    assert torch.equal(result.model.classifier.weight, model.classifier.weight)  # output layer untouched
    conv = result.model.features[4].weight
    assert 0.3 < float((conv == 0).float().mean()) < 0.9


def test_output_layer_is_found_by_execution_order():
    model, inputs = tiny_cnn()
    assert output_layer_name(model, inputs) == "classifier"
    bert, bert_inputs = tiny_bert()
    assert len(find_attention(bert)) == 2


BAD_INPUT = [
    (dict(ratio=0.0), "ratio 0.0 is out of range"),
    (dict(ratio=1.0), "ratio 1.0 is out of range"),
    (dict(ratio=-0.5), "ratio -0.5 is out of range"),
    (dict(ratio=1.5), "ratio 1.5 is out of range"),
    (dict(ignore=("features.44",)), "no layer named 'features.44'.*did you mean features.4"),
    (dict(ignore=("clasifier",)), "no layer named 'clasifier'.*classifier"),
    (dict(structure="blocks"), "unknown pruning structure 'blocks'"),
    (dict(importance="hessianx"), "unknown importance 'hessianx'"),
    (dict(structure="heads"), "no attention module"),
    (dict(round_to=0), "round_to 0"),
]


@pytest.mark.parametrize("fields, message", BAD_INPUT)
def test_bad_input(fields, message):
    model, inputs = tiny_cnn()
    with pytest.raises(InputError, match=message):
        prune(model, inputs, Prune(**fields))


def test_ratio_that_removes_every_head_is_refused():
    model, inputs = tiny_bert()
    with pytest.raises(InputError, match="remove all 4 heads"):
        prune(model, inputs, Prune(ratio=0.9, structure="heads"))


FACTORY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 4)

    def forward(self, image):
        return self.fc(self.body(image))

def build():
    torch.manual_seed(0)
    return Net().eval(), {"image": torch.randn(2, 1, 12, 12)}
'''


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(FACTORY)
    return f"{path}:build"


def test_cli_prune_writes_checkpoint_and_verified_onnx(tmp_path, factory):
    from dlopt.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["prune", factory, "--ratio", "0.5", "-o", str(out), "--bench-seconds", "0.5"])
    assert result.exit_code == 0, result.output
    assert re.search(r"parameters\s+\d+\s+\d+", result.output)
    assert re.search(r"latency \(1 thread\)", result.output)
    import onnx

    graph = onnx.load(str(out / "pruned.onnx")).graph
    conv_weights = [i for i in graph.initializer if len(i.dims) == 4]
    assert sorted(tuple(w.dims)[0] for w in conv_weights) == [8, 8]
    checkpoint = read_checkpoint(out / "pruned.pt")
    assert checkpoint.source == factory
    assert (out / "prune.json").is_file()


def test_cli_unstructured_makes_no_speed_claim(tmp_path, factory):
    from dlopt.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["prune", factory, "--ratio", "0.5", "--structure", "unstructured",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "sparsity" in result.output and "latency" not in result.output
    assert "no speedup" in result.output
    with gzip.open(out / "pruned.onnx.gz") as f:
        assert len(f.read()) == (out / "pruned.onnx").stat().st_size


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.2"], "ratio 1.2 is out of range"),
    (["--ignore", "bodyy.0"], "no layer named 'bodyy.0'"),
    (["--structure", "heads"], "no attention module"),
])
def test_cli_bad_input_exits_2(tmp_path, factory, args, message):
    from dlopt.cli import main

    result = CliRunner().invoke(main, ["prune", factory, "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output)
    assert "Traceback" not in result.output


@pytest.mark.heavy
def test_minilm_heads_and_ffn_halved_embedding_width_kept():
    from dlopt.models import get_reference_model

    module, inputs = get_reference_model("minilm").build()
    result = prune(module, inputs, Prune(ratio=0.5))
    layers = result.model.bert.encoder.layer
    assert len(layers) == 6
    for layer in layers:
        assert layer.attention.self.num_attention_heads == 6 and layer.attention.self.query.out_features == 192
        assert layer.intermediate.dense.out_features == 768 and layer.output.dense.out_features == 384
    out = result.model(**inputs)
    assert out.shape == (2, 384)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))  # still an L2-normalized embedding
    assert 0.45 < result.report["macs_after"] / result.report["macs_before"] < 0.55
