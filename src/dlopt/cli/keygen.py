"""dlopt keygen: an Ed25519 key pair for signing bundles (`dlopt package --sign-key`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("keygen",
               short_help="Make an Ed25519 key pair to sign bundles (package --sign-key, verify --trusted-key).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for dlopt-signing.key (private, mode 0600) and dlopt-signing.pub.")
@click.option("--private", "private_path", type=click.Path(dir_okay=False), default=None,
              help="Private key file (instead of -o).")
@click.option("--public", "public_path", type=click.Path(dir_okay=False), default=None,
              help="Public key file (instead of -o).")
def command(out_dir, private_path, public_path):
    """Write a new Ed25519 key pair as PEM files; existing files are never overwritten.

    Sign with the private key (`dlopt package M.onnx -o B --sign-key KEY`); give the public key to
    whoever checks the bundle (`dlopt verify B --trusted-key KEY.pub`). Keep the private key secret.
    """
    from dlopt.errors import InputError
    from dlopt.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, generate_key_pair

    if out_dir is not None and (private_path or public_path):
        raise InputError("-o and --private/--public both given", "give -o DIR, or both --private and --public")
    if out_dir is None and not (private_path and public_path):
        raise InputError("no key paths given", "give -o DIR, or both --private and --public")
    if out_dir is not None:
        folder = Path(out_dir)
        if not folder.is_dir():
            raise InputError(f"key folder {folder} does not exist", "create it first")
        private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    fingerprint = generate_key_pair(private_path, public_path)
    click.echo(f"private key: {private_path} (mode 0600; keep it secret)")
    click.echo(f"public key:  {public_path}")
    click.echo(f"fingerprint: {fingerprint}")
