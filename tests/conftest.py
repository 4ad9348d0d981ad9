"""Shared fixtures: tiny random-weight models of the real architectures, written to disk once per session."""

import logging
import os

import pytest
import torch

# Reproducible CPU numerics across the suite; no test may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'prior','clip','decoder'} paths in a ComfyUI-like models/ tree at the README's default names."""
    from lambda_eclipse.core.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("models")
    paths = write_tiny_models(root)
    paths["root"] = root
    return paths


@pytest.fixture(scope="session")
def tiny_clip(tiny_models):
    from lambda_eclipse.core.clip import load_clip

    return load_clip(tiny_models["clip"])


@pytest.fixture(scope="session")
def tiny_prior(tiny_models):
    from lambda_eclipse.core.prior import load_prior

    return load_prior(tiny_models["prior"])


@pytest.fixture
def caplog_eclipse(caplog):
    caplog.set_level(logging.INFO, logger="lambda_eclipse")
    return caplog
