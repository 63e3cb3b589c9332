"""Shared fixtures: small exact models."""

from __future__ import annotations

import pytest
import torch

from egps_ppl.models.markov import MarkovLM


@pytest.fixture
def eos_heavy_model() -> MarkovLM:
    """V = 3 with EOS (id 0) likely from several states: many length-changing moves."""
    return MarkovLM([0.4, 0.3, 0.3], [[1 / 3, 1 / 3, 1 / 3], [0.45, 0.5, 0.05], [0.2, 0.1, 0.7]], eos_token_id=0)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one intra-op thread, restored after each test (a test or a CLI run may change it): the
    tests run many small tensor ops, where threads gain nothing, and on a busy 2-core machine their
    synchronisation makes each op cost milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
