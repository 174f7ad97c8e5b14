"""The router bundle: a folder with ``manifest.json`` and model files in data formats.

The manifest lists the sha256 of every file; loading verifies each one, so a corrupt,
truncated or tampered bundle fails before any model is built, with one ``BundleError`` that
names the file. Nothing in a bundle is executable (no pickle, no joblib).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(Exception):
    """The bundle cannot be used: names the file and what is wrong with it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``d`` (except the manifest) into ``manifest["files"]`` and write it."""
    d = Path(d)
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(d).as_posix()] = sha256_file(p)
    manifest = {**manifest, "schema_version": SCHEMA_VERSION, "files": files}
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, d / MANIFEST)
    return manifest


def read_manifest(d: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and check a bundle's manifest (and, with ``verify``, every file's sha256)."""
    d = Path(d)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise BundleError(f"{d}: not a bundle folder (expected a directory with {MANIFEST})")
    if not mpath.exists():
        raise BundleError(f"{mpath}: missing; is {d} a router bundle?")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: expected a JSON object")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{mpath}: no integer schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(f"{mpath}: schema_version {version} is newer than this router supports "
                          f"({SCHEMA_VERSION}); upgrade the router package")
    if version < 1:
        raise BundleError(f"{mpath}: schema_version {version} is not supported")
    for key in ("tiers", "featurizer", "success", "cost", "policy", "files"):
        if key not in manifest:
            raise BundleError(f"{mpath}: missing key {key!r}")
    if verify:
        for rel, digest in manifest["files"].items():
            p = (d / rel).resolve()
            if d.resolve() not in p.parents:
                raise BundleError(f"{mpath}: file entry {rel!r} points outside the bundle")
            if not p.exists():
                raise BundleError(f"{d / rel}: listed in the manifest but missing")
            if sha256_file(p) != digest:
                raise BundleError(f"{d / rel}: sha256 mismatch (corrupt or modified after export)")
    return manifest
