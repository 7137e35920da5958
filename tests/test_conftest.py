"""The suite's own hooks (tests/conftest.py): with RTNQ_REQUIRE_CUDA_BUILD set, as scripts/test.sh sets it after
building the CUDA library, a skipped nvcc test fails the run; gpu tests and other skips are left alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

TINY = '''
import pytest

pytestmark = pytest.mark.nvcc


@pytest.fixture
def lib():
    pytest.skip("CUDA library not built: librtnq_cuda.so not found")


@pytest.fixture
def no_gpu(lib):
    pytest.skip("a GPU is present; this checks the no-GPU behaviour")


def test_lib_missing(lib):
    pass


def test_skips_in_the_body():
    pytest.skip("nm not installed")


@pytest.mark.skipif(True, reason="a skipif marker")
def test_skipif_marker():
    pass


@pytest.mark.nvcc(allow_skip="a GPU is present")
def test_allowed_reason():
    pytest.skip("a GPU is present; this checks the no-GPU behaviour")


@pytest.mark.nvcc(allow_skip="a GPU is present")
def test_allowed_reason_but_library_missing(lib):
    pass


@pytest.mark.gpu
def test_gpu_may_skip():
    pytest.skip("no CUDA GPU visible to torch")


@pytest.mark.xfail(reason="known", strict=True)
def test_xfail():
    raise AssertionError


def test_passes():
    pass
'''

PLAIN = '''
import pytest


def test_unmarked_skip():
    pytest.skip("not an nvcc test")
'''

INI = """[pytest]
markers =
    gpu: gpu
    nvcc: nvcc
addopts = --strict-markers -p no:cacheprovider
"""

FAILS = {"test_lib_missing", "test_skips_in_the_body", "test_skipif_marker", "test_allowed_reason_but_library_missing"}
SKIPS = {"test_allowed_reason", "test_gpu_may_skip", "test_xfail", "test_unmarked_skip"}


def _run(tmp_path: Path, value: str | None) -> tuple[int, dict[str, str], str]:
    d = tmp_path / "suite"
    d.mkdir()
    (d / "conftest.py").write_text(CONFTEST.read_text())
    (d / "test_tiny.py").write_text(TINY)
    (d / "test_plain.py").write_text(PLAIN)
    (d / "pytest.ini").write_text(INI)
    env = {k: v for k, v in os.environ.items() if k != "RTNQ_REQUIRE_CUDA_BUILD"}
    if value is not None:
        env["RTNQ_REQUIRE_CUDA_BUILD"] = value
    xml = tmp_path / "report.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", f"--junitxml={xml}", str(d)], cwd=d, env=env,
                       capture_output=True, text=True, timeout=120)
    outcomes: dict[str, str] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = kinds[0] if kinds else "passed"
    return r.returncode, outcomes, r.stdout + r.stderr


def _counts(out: str) -> dict[str, int]:
    """pytest's closing line as {outcome: count} (junit XML reports a failed xfail as skipped; this line does not)."""
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", out.strip().splitlines()[-1].split(" in ")[0])}


@pytest.mark.parametrize("value", [None, "", "0"])
def test_without_the_variable_skips_stay_skips(tmp_path, value):
    code, outcomes, out = _run(tmp_path, value)
    assert code == 0, out
    assert {name for name, o in outcomes.items() if o == "skipped"} == FAILS | SKIPS, out
    assert outcomes["test_passes"] == "passed"
    assert _counts(out) == {"passed": 1, "skipped": 7, "xfailed": 1}, out


def test_with_the_variable_a_skipped_nvcc_test_fails(tmp_path):
    code, outcomes, out = _run(tmp_path, "1")
    assert code == 1, out
    assert {name for name, o in outcomes.items() if o in ("failure", "error")} == FAILS, out
    assert {name for name, o in outcomes.items() if o == "skipped"} == SKIPS, out
    assert outcomes["test_passes"] == "passed"
    # Skips in the test body fail; skips in setup (fixtures, skip markers) are errors; an xfail stays an xfail.
    assert _counts(out) == {"failed": 1, "errors": 3, "passed": 1, "skipped": 3, "xfailed": 1}, out
    assert "RTNQ_REQUIRE_CUDA_BUILD=1 (the CUDA library was built) but this nvcc test skipped: CUDA library not " \
           "built: librtnq_cuda.so not found" in out
    assert "nvcc test skipped: nm not installed" in out
