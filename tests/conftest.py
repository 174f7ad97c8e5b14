"""Shared fixtures: MLflow always points at a temporary SQLite store, never the work tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(autouse=True, scope="session")
def _mlflow_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'mlflow.db'}"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield d


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test with the working directory in a temporary folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
