"""Signed bundles: `dlopt keygen`, `dlopt package --sign-key`, `dlopt verify --trusted-key`.

The manifest's hashes only prove integrity: an attacker who swaps the model can rewrite the hashes
and samples to match. These tests do exactly that and check that only the signature catches it, that
an edited-in tolerance never loosens verify's own, and that any edited manifest field breaks the
signature."""

import json
import os
import shutil
import stat

import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from dlopt.cli import main
from dlopt.errors import InputError
from dlopt.manifest import sha256_file
from dlopt.package import PackageConfig, package
from dlopt.signing import generate_key_pair, load_public_key, public_fingerprint
from dlopt.verify import Tolerance, verify_bundle

from test_package import mlp_model


def swapped_model() -> onnx.ModelProto:
    """The same graph and interface as mlp_model, with other weights: what an attacker would ship."""
    model = mlp_model()
    for init in model.graph.initializer:
        if init.name == "w2":
            init.CopyFrom(numpy_helper.from_array(-2.0 * numpy_helper.to_array(init), "w2"))
    return model


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    fingerprint = generate_key_pair(root / "signer.key", root / "signer.pub")
    generate_key_pair(root / "other.key", root / "other.pub")
    return {"key": root / "signer.key", "pub": root / "signer.pub", "other_key": root / "other.key",
            "other_pub": root / "other.pub", "fingerprint": fingerprint}


@pytest.fixture(scope="module")
def built(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("signed")
    onnx.save_model(mlp_model(), str(root / "mlp.onnx"))
    onnx.save_model(swapped_model(), str(root / "evil.onnx"))
    package(root / "mlp.onnx", root / "signed", PackageConfig(measure_s=0.0), sign_key=keys["key"])
    package(root / "mlp.onnx", root / "unsigned", PackageConfig(measure_s=0.0))
    # the attacker's bundle of the swapped model, packaged honestly under the same name
    package(root / "evil.onnx", root / "evil", PackageConfig(measure_s=0.0, name="mlp"))
    return root


@pytest.fixture
def bundle(built, tmp_path):
    shutil.copytree(built / "signed", tmp_path / "bundle")
    return tmp_path / "bundle"


def _verify(path, *args):
    return CliRunner().invoke(main, ["verify", str(path), *args])


def _rewrite(bundle, edit):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    for entry in manifest["files"]:
        entry["sha256"] = sha256_file(bundle / entry["path"])
        entry["bytes"] = (bundle / entry["path"]).stat().st_size
    path.write_text(json.dumps(manifest, indent=2))


def _error_lines(output):
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    cli = CliRunner().invoke(main, ["keygen", "-o", str(tmp_path)])
    assert cli.exit_code == 0, cli.output
    private, public = tmp_path / "dlopt-signing.key", tmp_path / "dlopt-signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert public_fingerprint(load_public_key(public)) in cli.output
    before = (private.read_bytes(), public.read_bytes())
    again = CliRunner().invoke(main, ["keygen", "-o", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output and "Traceback" not in again.output
    assert (private.read_bytes(), public.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dlopt-signing.key", "dlopt-signing.pub"]  # no temp files


def test_keygen_creates_its_missing_folder_with_mode_0700(tmp_path):
    keys = tmp_path / "project" / "keys"
    cli = CliRunner().invoke(main, ["keygen", "-o", str(keys)])
    assert cli.exit_code == 0, cli.output
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert sorted(p.name for p in keys.iterdir()) == ["dlopt-signing.key", "dlopt-signing.pub"]
    assert stat.S_IMODE((keys / "dlopt-signing.key").stat().st_mode) == 0o600


def test_keygen_refuses_a_file_as_its_folder(tmp_path):
    (tmp_path / "keys").write_text("not a folder")
    cli = CliRunner().invoke(main, ["keygen", "-o", str(tmp_path / "keys")])
    assert cli.exit_code == 2 and "is a file" in cli.output and "Traceback" not in cli.output
    assert (tmp_path / "keys").read_text() == "not a folder"


@pytest.mark.parametrize("args, message", [
    (["--private", "{tmp}/a.key"], "no key paths"),
    (["-o", "{tmp}", "--private", "{tmp}/a.key", "--public", "{tmp}/a.pub"], "both given"),
    (["--private", "{tmp}/same", "--public", "{tmp}/same"], "are the same"),
])
def test_keygen_bad_arguments_are_input_errors(tmp_path, args, message):
    cli = CliRunner().invoke(main, ["keygen", *[a.format(tmp=tmp_path) for a in args]])
    assert cli.exit_code == 2 and message in cli.output
    assert list(tmp_path.iterdir()) == []


def test_a_signed_bundle_verifies_against_its_key(bundle, keys):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["signature"] == {"algorithm": "ed25519", "key_fingerprint": keys["fingerprint"],
                                     "file": "manifest.sig"}
    assert "manifest.sig" not in [f["path"] for f in manifest["files"]]
    cli = _verify(bundle, "--trusted-key", str(keys["pub"]))
    assert cli.exit_code == 0, cli.output
    assert "signed by the trusted key" in cli.output.splitlines()[-1]
    plain = _verify(bundle)
    assert plain.exit_code == 0 and "integrity only" in plain.output and "origin not checked" in plain.output


def test_a_manifest_rewritten_for_a_swapped_model_passes_integrity_but_not_the_trusted_key(bundle, built, keys):
    for name in ("model.ort", "samples.npz"):  # the attacker's model, and samples of its own outputs
        shutil.copyfile(built / "evil" / name, bundle / name)
    _rewrite(bundle, lambda m: None)
    result = verify_bundle(bundle)
    assert result.passed and result.outputs[0]["max_abs_diff"] <= 1e-5, "integrity alone cannot see the swap"
    plain = _verify(bundle)
    assert plain.exit_code == 0 and "integrity only" in plain.output
    cli = _verify(bundle, "--trusted-key", str(keys["pub"]))
    assert cli.exit_code == 1 and "Traceback" not in cli.output
    errors = _error_lines(cli.output)
    assert len(errors) == 1 and "signature" in errors[0] and "changed after it was signed" in errors[0]


def test_a_tolerance_edited_into_the_manifest_does_not_loosen_verify(bundle, built):
    shutil.copyfile(built / "evil" / "model.ort", bundle / "model.ort")  # the source's samples stay

    def loosen(manifest):
        for check in manifest["verification"]["checks"]:
            check["criterion"] = {"atol": 1e30, "rtol": 1e30}
    _rewrite(bundle, loosen)
    result = verify_bundle(bundle)
    assert all(f["status"] == "ok" for f in result.files)
    assert not result.passed and result.outputs[0]["criterion"] == {"atol": 1e-4, "rtol": 1e-3}
    assert result.outputs[0]["max_abs_diff"] > 0.01
    cli = _verify(bundle)
    assert cli.exit_code == 1 and "model.ort y" in cli.output
    # the user may choose another tolerance on purpose
    assert _verify(bundle, "--atol", "10").exit_code == 0


def test_a_tighter_recorded_tolerance_is_kept_and_a_bad_one_ignored():
    tolerance = Tolerance()
    assert tolerance.model_criterion({"atol": 1e-7, "rtol": 1e30}) == {"atol": 1e-7, "rtol": 1e-3}
    assert tolerance.model_criterion({"atol": "1e30", "rtol": float("nan")}) == {"atol": 1e-4, "rtol": 1e-3}
    assert tolerance.model_criterion(None) == {"atol": 1e-4, "rtol": 1e-3}
    assert Tolerance(atol=0.5, rtol=0.0, explicit=True).model_criterion({"atol": 1e-7}) == {"atol": 0.5, "rtol": 0.0}
    assert tolerance.pte_criterion("int8", {"min_sqnr_db": -1e30}) == {"min_sqnr_db": 15.0}
    assert tolerance.pte_criterion("fp32", {"min_sqnr_db": 80.0}) == {"min_sqnr_db": 80.0}
    assert tolerance.pte_criterion("made-up", None) == {"min_sqnr_db": 60.0}
    with pytest.raises(InputError, match="atol"):
        Tolerance(atol=float("inf"))


@pytest.mark.parametrize("edit", [
    lambda m: m.__setitem__("name", "resnet-certified"),
    lambda m: m["runtime"].__setitem__("onnxruntime", "1.99.0"),
    lambda m: m["source"].__setitem__("sha256", "0" * 64),
], ids=["name", "onnxruntime-version", "source-sha256"])
def test_an_edited_manifest_field_breaks_the_signature(bundle, keys, edit):
    _rewrite(bundle, edit)
    assert verify_bundle(bundle).passed  # the hashes still match
    cli = _verify(bundle, "--trusted-key", str(keys["pub"]))
    assert cli.exit_code == 1 and len(_error_lines(cli.output)) == 1
    assert "changed after it was signed" in cli.output


def test_a_manifest_re_signed_with_another_key_fails(bundle, keys):
    from dlopt.signing import load_private_key, sign

    other = load_private_key(keys["other_key"])
    (bundle / "manifest.sig").write_bytes(sign((bundle / "manifest.json").read_bytes(), other))
    cli = _verify(bundle, "--trusted-key", str(keys["pub"]))
    assert cli.exit_code == 1 and "signed by another key" in _error_lines(cli.output)[0]
    assert _verify(bundle, "--trusted-key", str(keys["other_pub"])).exit_code == 1  # the manifest names the signer


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "manifest.sig").unlink(), "not signed"),
    (lambda b: (b / "manifest.sig").write_text("{}"), "damaged"),
    (lambda b: (b / "manifest.sig").write_text('{"signature": "' + "A" * 88 + '"}'), "changed after it was signed"),
])
def test_a_missing_or_bad_signature_fails(bundle, keys, damage, message):
    damage(bundle)
    cli = _verify(bundle, "--trusted-key", str(keys["pub"]))
    assert cli.exit_code == 1 and message in _error_lines(cli.output)[0] and "Traceback" not in cli.output


def test_an_unsigned_bundle_fails_with_a_trusted_key(built, keys):
    cli = _verify(built / "unsigned", "--trusted-key", str(keys["pub"]))
    assert cli.exit_code == 1 and "not signed" in cli.output


@pytest.mark.parametrize("key, message", [("pub", "not a PEM private key"), ("missing", "does not exist")])
def test_package_with_a_bad_signing_key_writes_nothing(tmp_path, keys, key, message):
    onnx.save_model(mlp_model(), str(tmp_path / "mlp.onnx"))
    path = keys.get(key, tmp_path / "nope.key")
    cli = CliRunner().invoke(main, ["package", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "b"),
                                    "--measure", "0", "--sign-key", str(path)])
    assert cli.exit_code == 2 and message in cli.output and "Traceback" not in cli.output
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx"]


def test_package_refuses_a_signing_key_inside_the_bundle_it_replaces(tmp_path, keys):
    onnx.save_model(mlp_model(), str(tmp_path / "mlp.onnx"))
    bundle = tmp_path / "b"  # a real bundle, so that --overwrite would replace it
    first = CliRunner().invoke(main, ["package", str(tmp_path / "mlp.onnx"), "-o", str(bundle), "--measure", "0"])
    assert first.exit_code == 0, first.output
    shutil.copyfile(keys["key"], bundle / "signer.key")
    (bundle / "signer.key").chmod(0o600)  # a private key's mode: else that is what is refused
    cli = CliRunner().invoke(main, ["package", str(tmp_path / "mlp.onnx"), "-o", str(bundle), "--measure", "0",
                                    "--overwrite", "--sign-key", str(bundle / "signer.key")])
    assert cli.exit_code == 2 and "inside the bundle folder" in cli.output
    assert (bundle / "signer.key").read_bytes() == keys["key"].read_bytes()


def test_verify_with_an_unreadable_trusted_key_is_an_input_error(bundle, keys):
    cli = _verify(bundle, "--trusted-key", str(keys["key"]))
    assert cli.exit_code == 2 and "not a PEM public key" in cli.output
