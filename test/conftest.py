"""Shared fixtures: tiny random-weight models built once per test session, the sync audit."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's CPU interpreter. triton.jit picks the interpreter
# when a kernel is defined, so this must happen before any sglab kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sglab.srt.debug.sync_audit import AUDIT
from sglab.srt.utils.dummy_model import make_dummy_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(preset) -> path of a tiny HF model directory with random weights."""
    root = tmp_path_factory.mktemp("models")
    made: dict[str, str] = {}

    def get(preset: str) -> str:
        if preset not in made:
            made[preset] = make_dummy_model(preset, os.path.join(root, preset), weights=True)
        return made[preset]

    return get


@pytest.fixture
def audit():
    """The process-wide sync audit, switched off and emptied after the test."""
    yield AUDIT
    AUDIT.enabled = False
    AUDIT.reset()
