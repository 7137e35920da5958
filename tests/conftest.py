from pathlib import Path

import pytest
from safetensors.torch import load_file

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def vectors():
    """Reference vectors produced by the reference implementations (tests/data/README.md)."""

    def load(name: str):
        return load_file(str(DATA / f"{name}.safetensors"))

    return load
