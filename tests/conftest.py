"""Shared fixtures: the tiny A1111-named models (see tiny_models.py) and hypothesis profiles.

``sd1_model`` / ``sd2_model`` / ``sdxl_model`` are built once per session and shared: never change
them (no patching, no ``.to(dtype)``). A test that patches takes ``fresh_sd1`` / ``fresh_sd2`` /
``fresh_sdxl``, a new model of its own, equal to the shared one.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import tiny_models

# The tiny models gain nothing from threads, and a second OpenMP thread that has to wait for a busy
# core makes every op many times slower. OMP_NUM_THREADS still decides when it is set.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# Deterministic unless asked otherwise (tests/run, CI and a bare pytest alike): each test draws its examples from
# a fixed seed (derandomize) and no example database is read or written, so a run never depends on the machine's
# history or on luck. A random search is opt-in: HYPOTHESIS_PROFILE=fuzz runs many more examples from a fresh
# seed each time (tests that ask for a number of examples get at least the profile's), and keeps what fails in
# .hypothesis/ so that the next fuzz run tries it first; print_blob gives the line that reproduces a failure.
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", deadline=None, max_examples=20_000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def steady_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's memory as the runtime reads it, fixed at 16 of 24 GiB free: the automatic mode and the CPU's
    budgets depend on MemAvailable, which other processes on the machine change under the tests (a WebUI beside
    the suite once left less than the 1.5 GiB reserve, and a static set stayed in bypass). Tests of low memory
    set their own figures on top of this."""
    from lora_core import memory

    monkeypatch.setattr(memory, "_host_report", lambda: memory.MemoryReport(16 << 30, 24 << 30))


def _build(family: str) -> tiny_models.TinySDModel:
    """A new model; the builders seed the global RNG, which is given back as it was."""
    with torch.random.fork_rng(devices=[]):
        return tiny_models.build(family)


@pytest.fixture(scope="session")
def sd1_model() -> tiny_models.TinySDModel:
    return _build("sd1")


@pytest.fixture(scope="session")
def sd2_model() -> tiny_models.TinySDModel:
    return _build("sd2")


@pytest.fixture(scope="session")
def sdxl_model() -> tiny_models.TinySDModel:
    return _build("sdxl")


# A fresh model is built anew rather than deep-copied: the builders are deterministic (it equals the
# shared one) and building is faster than copy.deepcopy of ~1,300 modules.
@pytest.fixture
def fresh_sd1() -> tiny_models.TinySDModel:
    return _build("sd1")


@pytest.fixture
def fresh_sd2() -> tiny_models.TinySDModel:
    return _build("sd2")


@pytest.fixture
def fresh_sdxl() -> tiny_models.TinySDModel:
    return _build("sdxl")


@pytest.fixture(params=tiny_models.FAMILIES)
def model_family(request: pytest.FixtureRequest) -> str:
    """Runs a test once per family: 'sd1', 'sd2', 'sdxl'."""
    return request.param


@pytest.fixture
def shared_model(model_family: str, request: pytest.FixtureRequest) -> tiny_models.TinySDModel:
    """The session model of ``model_family`` (read only)."""
    return request.getfixturevalue(f"{model_family}_model")


@pytest.fixture
def fresh_model(model_family: str, request: pytest.FixtureRequest) -> tiny_models.TinySDModel:
    """A private copy of the model of ``model_family``."""
    return request.getfixturevalue(f"fresh_{model_family}")
