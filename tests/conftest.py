"""Shared fixtures: the real SmolLM2 model (loaded once), tiny-model folders converted or exported once per test
process (tests/conversions.py), and WikiText-2 when present."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from edgeattn.evaluation.calibration import wikitext_path
from tests.conversions import SharedFolders

# Property tests (tests/test_properties.py): the same cases on every run and machine (a fixed seed,
# no example database), no per-example deadline (a shared CI core can be slow), max_examples set per test.
settings.register_profile("edgeattn", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edgeattn")

TINY_FAMILIES = ["gpt2", "llama", "mistral", "phi3", "qwen2"]

# The unit layer (`make test-fast`, under a minute): pure logic on tiny tensors, no model loaded,
# nothing converted. Tests of every other module are marked slow.
UNIT_MODULES = {
    "test_spec", "test_metrics", "test_reference_tables", "test_attention_vs_reference",
    "test_output_folder", "test_emulation", "test_layers", "test_manifest",
}


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)  # `make test` runs one worker per core already


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.stem not in UNIT_MODULES:
            item.add_marker(pytest.mark.slow)


def pytest_ignore_collect(collection_path, config):
    """`-m "not slow"` (`make test-fast`) does not even import the other modules."""
    if config.getoption("markexpr") == "not slow" and collection_path.name.startswith("test_"):
        return collection_path.stem not in UNIT_MODULES or None
    return None


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M (loaded once per run; tests must deepcopy before rewriting)."""
    from edgeattn.models import load

    return load("smollm2")


@pytest.fixture
def smollm2_decoder(smollm2):
    return copy.deepcopy(smollm2.decoder)


@pytest.fixture(scope="session")
def shared_folders(tmp_path_factory) -> SharedFolders:
    return SharedFolders(tmp_path_factory)


@pytest.fixture(scope="session")
def converted(shared_folders):
    """``converted(model="tiny-llama", spec=AttentionSpec(), **ConvertOptions fields) -> (folder, manifest)``:
    converted once per test process (under ``--dist loadfile``, for every file a worker runs). Copy the folder
    before changing it."""
    return shared_folders.converted


@pytest.fixture(scope="session")
def exported(shared_folders):
    """``exported(family, spec, lowering_for, max_length) -> (folder, decoder, lowerings)``: tiny-``family``
    rewritten and exported once per test process. Copy the folder before changing it."""
    return shared_folders.exported


@pytest.fixture(autouse=True, scope="module")
def _shared_folders_unchanged(shared_folders, request):
    """After each module, the shared folders it used must be as they were made: later files read them."""
    yield
    shared_folders.check_unchanged(request.node.nodeid)


def wikitext_or_skip(split: str):
    path = wikitext_path(split)
    if path is None:
        pytest.skip(f"WikiText-2 {split}.txt not found "
                    "(expected in ../shared/data/wikitext-2 or $EDGEATTN_WIKITEXT_DIR)")
    return path
