"""Run every notebook in ``notebooks/`` top to bottom, each as its own test.

Each notebook is executed with nbclient on a kernel of *this* interpreter (a kernelspec written
to a temporary folder, so whatever ``python3`` kernel happens to be installed is never used), in
a temporary working folder holding a copy of the notebook, with a 600 s timeout per cell.  The
notebooks in the repository are left as they are, unless ``SAVE_NOTEBOOK_OUTPUTS=1`` asks for
the executed copies (with outputs) to be written back over them.

The kernel runs torch on ``NOTEBOOK_THREADS`` threads (default 1, through ``OMP_NUM_THREADS``):
on a shared, busy CPU two OpenMP threads made each forward pass of the embedded model ~20x
slower than one.

A notebook whose code draws something (matplotlib, circuitsvis, ``display``) must produce at least
one image or HTML output.  Notebooks should locate repository files through the installed
package (``interp.__file__``), not relative to their own folder, since they run elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(p for p in NOTEBOOK_DIR.glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
CELL_TIMEOUT_S = 600
KERNEL_NAME = "safety-layers-test"
PLOTTING = re.compile(r"\bplt\.|\bplot_\w*\(|matplotlib|circuitsvis|\bdisplay\(|\bFigure\(")
RICH_OUTPUTS = ("image/png", "image/svg+xml", "image/jpeg", "text/html")


def draws_something(nb) -> bool:
    return any(cell.cell_type == "code" and PLOTTING.search(cell.source) for cell in nb.cells)


def rich_outputs(nb) -> list[str]:
    return [
        mime
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") in ("display_data", "execute_result")
        for mime in output.get("data", {})
        if mime in RICH_OUTPUTS
    ]


def kernel_processes() -> list:
    """Live ipykernel processes started by this test process."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and "ipykernel_launcher" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """Kernels that run ``sys.executable`` (this virtual environment), whatever is installed."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    threads = os.environ.get("NOTEBOOK_THREADS", "1")
    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / KERNEL_NAME
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
        "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])

    def make() -> KernelManager:
        return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)

    return make


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks in notebooks/")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, kernel_manager_factory):
    work = tmp_path / "run"
    work.mkdir()
    copy = work / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    km = kernel_manager_factory()
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(work)}},
        allow_errors=False,
    )
    try:
        client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    finally:
        # nbclient shuts down only kernels it started itself; this one was handed in
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert not kernel_processes(), "a notebook kernel outlived its test"
    nbformat.write(nb, copy)

    if draws_something(nb):
        assert rich_outputs(nb), f"{path.name} draws plots but produced no image or HTML output"
    if os.environ.get("SAVE_NOTEBOOK_OUTPUTS") == "1":
        nbformat.write(nb, path)
