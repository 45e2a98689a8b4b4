"""dlopt verify: re-check a bundle's hashes and outputs."""

from __future__ import annotations

import click


@click.command("verify", short_help="Re-check a bundle: every file's sha256, no extra files, outputs vs the source's.")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--hashes-only", is_flag=True, help="Check files only, do not run the model.")
def command(bundle, hashes_only):
    """Verify BUNDLE (a folder written by `dlopt package`).

    Exit code 0 when every file matches the manifest (none missing, none changed, none added) and the
    model still reproduces the source model's stored outputs within the recorded tolerance; 1 on any
    tampering or mismatch; 2 when BUNDLE is not a folder.
    """
    from dlopt.errors import VerificationError
    from dlopt.verify import format_result, verify_bundle

    result = verify_bundle(bundle, check_outputs=not hashes_only)
    click.echo(format_result(result))
    if not result.passed:
        problems = result.problems()
        raise VerificationError(f"bundle {bundle} failed verification: {'; '.join(problems[:4])}"
                                + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""),
                                "do not ship it; package it again from the source model")
    m = result.manifest
    click.echo(f"ok: {bundle} ({m['name']}, {m['target']}, {len(result.files)} files, built by dlopt "
               f"{m['dlopt_version']} with onnxruntime {m['runtime']['onnxruntime']})")
