"""Suite-wide settings, kept here once: no test file sets them itself.

The layout mirrors the package: ``tests/<package>/`` holds the tests of ``sclatent/<package>/``
(``tests/images/`` those of the image wing), ``tests/test_<module>.py`` those of a top-level module
``sclatent/<module>.py``, and the repository-wide tests (architecture, repository, seeded outputs,
docs) sit at the top.

- one torch thread for the whole session (``_one_torch_thread``);
- matplotlib's non-interactive Agg backend (set before anything imports pyplot);
- ``repo``: the repository root, wherever a test file sits under ``tests/``;
- ``shared_data_dir`` and the ``needs_data`` marker: the shared data folder, ``$SCLATENT_DATA_DIR``
  or, as ``.ci/run`` sets it, the ``shared/data`` folder beside the repository; tests skip with the
  reason when it, or a named dataset in it, is missing;
- the ``needs_native`` marker: skip, naming the cause, where sclatent's C kernels did not load.

The markers are declared in ``pyproject.toml`` (``--strict-markers``); warnings filters live there too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Before any test module imports matplotlib: figures are written to files, never shown.
os.environ["MPLBACKEND"] = "Agg"

_REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    return Path(os.environ.get("SCLATENT_DATA_DIR") or _REPO.parent / "shared" / "data")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Two OpenMP threads on a 2-core machine that is running anything else spin on each other and
    # slow small models down many-fold; one thread keeps the suite's time predictable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def two_torch_threads():
    """Two torch threads for one test (the suite's default is one): the fused training passes then run
    their output-layer products side by side (``_gemm_pair``), the path training takes on a multi-core
    machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root: the working directory and ``PYTHONPATH`` of the subprocesses tests start."""
    return _REPO


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared data folder (``$SCLATENT_DATA_DIR``, else ``../shared/data``); skips the test if absent."""
    folder = _shared_data_dir()
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} does not exist (see SCLATENT_DATA_DIR)")
    return folder


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("needs_data"):
        folder = _shared_data_dir()
        missing = [name for name in marker.args if not (folder / name).is_dir()]
        if missing:
            pytest.skip(f"{', '.join(missing)} not in the shared data folder {folder} (see SCLATENT_DATA_DIR)")
    if item.get_closest_marker("needs_native") is not None:
        from sclatent import _native

        if _native.library() is None:
            pytest.skip(f"no native kernels: {_native.native_status()}")
