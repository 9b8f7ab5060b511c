"""Shared fixtures: the real GLUE files beside the checkout, tiny configs, a tiny random Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("LORASTUDY_TEST_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--regen-expected", action="store_true",
                     help="print the key numbers of the tiny end-to-end study (tests/test_pipeline.py EXPECTED)")


def pytest_configure(config):
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    assert GLUE_DIR.is_dir(), f"real GLUE data expected at {GLUE_DIR} (set LORASTUDY_TEST_GLUE_DIR)"
    return GLUE_DIR


@pytest.fixture
def tiny_cfg(tmp_path, glue_dir):
    """The CI preset with results in a temp dir and the local GLUE files."""
    from lorastudy.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"data.source={glue_dir}", f"output_dir={tmp_path / 'results'}"])


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, glue_dir) -> Path:
    """The tiny preset (configs/tiny.yaml) run end to end once per test session, for the tests that read a whole
    study (tests/test_pipeline.py, tests/test_merge.py). Read it, never edit it: copy it first."""
    from typer.testing import CliRunner

    from lorastudy.cli import app

    out = tmp_path_factory.mktemp("tiny") / "results"
    r = CliRunner().invoke(app, ["run", str(REPO / "configs" / "tiny.yaml"), "--data-dir", str(glue_dir), "--set",
                                 f"output_dir={out}"])
    assert r.exit_code == 0, r.output
    return out
