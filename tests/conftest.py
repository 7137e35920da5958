import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# scripts/test.sh sets this after `make -C cuda` succeeded: the CUDA library exists, so a test that needs it
# (marked nvcc) must not skip. A skip then means the build or the library lookup broke, and CI fails on it.
REQUIRE_CUDA_BUILD = "RTNQ_REQUIRE_CUDA_BUILD"


@pytest.fixture(scope="session")
def vectors():
    """Reference vectors produced by the reference implementations (tests/data/README.md)."""

    from safetensors.torch import load_file  # here, so that loading this conftest imports no torch

    def load(name: str):
        return load_file(str(DATA / f"{name}.safetensors"))

    return load


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small multi-shard checkpoint for the conversion I/O tests (source, pipeline, fast path)."""
    from rtnq import synthetic

    src = tmp_path_factory.mktemp("fp") / "m"
    return synthetic.write_checkpoint(src, synthetic.SampleSpec(layers=3, shards=2, odd_linear=True, hidden=256,
                                                            intermediate=640, vocab=4096))


def _skip_reason(rep) -> str:
    if isinstance(rep.longrepr, tuple):  # (path, lineno, "Skipped: reason")
        return str(rep.longrepr[2]).removeprefix("Skipped: ")
    return str(rep.longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """With RTNQ_REQUIRE_CUDA_BUILD set, a skipped nvcc test is a failure (gpu tests may still skip: no GPU)."""
    rep = yield
    if (
        rep.skipped
        and not hasattr(rep, "wasxfail")
        and os.environ.get(REQUIRE_CUDA_BUILD, "") not in ("", "0")
        and item.get_closest_marker("nvcc") is not None
        and item.get_closest_marker("gpu") is None
    ):
        reason = _skip_reason(rep)
        allowed = item.get_closest_marker("nvcc").kwargs.get("allow_skip")
        if not (allowed and allowed in reason):
            rep.outcome = "failed"
            rep.longrepr = (
                f"{REQUIRE_CUDA_BUILD}={os.environ[REQUIRE_CUDA_BUILD]} (the CUDA library was built) but this "
                f"nvcc test skipped: {reason}"
            )
    return rep
