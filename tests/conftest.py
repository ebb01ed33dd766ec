"""Suite-wide settings: no network at run time (albumentations checks for updates on import).

Also the tiny training run shared by the fault suite (``tests/faults``) and the checkpoint rows
of ``tests/test_bad_inputs.py``: one uninterrupted run per session.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def fault_synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in benchmark at 5% scale and 96 px."""
    from damex.config import SyntheticConfig
    from damex.data.synthetic import ensure_benchmark

    root = tmp_path_factory.mktemp("fault_synthetic")
    ensure_benchmark(SyntheticConfig(root=str(root), scale=0.05, image_size=96), progress=False)
    return root


@pytest.fixture(scope="session")
def fault_reference_run(
    fault_synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One uninterrupted fault run (``tests/faults/fault_setup.py``)."""
    sys.path.insert(0, str(Path(__file__).parent / "faults"))
    from fault_setup import FAULT_EPOCHS, fault_config_dict

    from damex.config import config_from_dict
    from damex.engine.trainer import train

    out = tmp_path_factory.mktemp("fault_reference") / "run"
    result = train(config_from_dict(fault_config_dict(fault_synthetic_root, out)))
    assert result.iterations == FAULT_EPOCHS and result.stop_reason == "completed"
    return out


@pytest.fixture(autouse=True)
def _no_leaked_thread_count():
    """torch's thread count is process-wide: a test (or the code it runs) must leave it as found."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the process-wide torch thread count changed from {before} to {after}")


@pytest.fixture
def single_thread():
    """One torch thread for the test (as in 1-thread workers), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
