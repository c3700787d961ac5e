"""Suite-wide test settings and helpers."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(autouse=True)
def _one_thread():
    # The tests use tiny matrices: on the shared 2-core CI box, OpenMP threads only spin
    # on barriers (steps measured up to 50x slower with 2 threads under load). Restored
    # after each test so code that picks its own thread count is tested as written.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def load_tool():
    """``load_tool("bench_pc")`` imports ``tools/bench_pc.py`` as a module (tools/ is not a
    package: the scripts are run by path)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, TOOLS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
