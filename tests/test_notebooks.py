"""Run every notebook in ``notebooks/`` top to bottom, each as its own test.

Each notebook is executed with nbclient on a kernel of *this* interpreter (a kernelspec written
to a temporary folder, so whatever ``python3`` kernel happens to be installed is never used), in
a temporary working folder holding a copy of the notebook, with a 600 s timeout per cell
(``NOTEBOOK_CELL_TIMEOUT`` changes it, for a busy machine).  The
notebooks in the repository are left as they are, unless ``SAVE_NOTEBOOK_OUTPUTS=1`` asks for
the executed copies (with outputs) to be written back over them.

The kernel runs torch on ``NOTEBOOK_THREADS`` threads (default 1, through ``OMP_NUM_THREADS``):
on a shared, busy CPU two OpenMP threads made each forward pass of the embedded model ~20x
slower than one.  Its progress bars are off (``TQDM_DISABLE``), and the outputs written back are
cleaned (``clean_outputs``): no stderr stream (progress bars, library warnings) and no absolute
path of the machine that ran them; a test holds the stored notebooks to that.

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
CELL_TIMEOUT_S = int(os.environ.get("NOTEBOOK_CELL_TIMEOUT", "600"))  # seconds per cell
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


ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:tmp|root|home|work|usr|opt|var|private|Users|mnt|srv)/")


TRAINER_LOG = re.compile(r"^\{'(?:loss|train_runtime|eval_\w+)': .*\}\n?", flags=re.M)
"""The per-step dicts transformers' Trainer prints when its progress bar is off."""


def clean_outputs(nb, roots: dict[str, str]) -> None:
    """Drop stderr streams (progress bars, library warnings) and the Trainer's per-step log lines,
    and write each of ``roots``' paths as its short name, in every output of ``nb`` (in place)."""

    def tidy(text: str) -> str:
        for path, name in sorted(roots.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(path, name)
        return text

    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = [o for o in cell.get("outputs", []) if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        for output in outputs:
            if "text" in output:
                output["text"] = tidy(TRAINER_LOG.sub("", output["text"]))
            for mime, value in output.get("data", {}).items():
                if isinstance(value, str) and not mime.startswith("image/"):
                    output["data"][mime] = tidy(value)
        cell["outputs"] = [o for o in outputs if not (o.get("output_type") == "stream" and not o.get("text"))]


def output_texts(nb) -> list[str]:
    return [text for cell in nb.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
            for text in [output.get("text", "")] + [v for m, v in output.get("data", {}).items()
                                                    if isinstance(v, str) and not m.startswith("image/")]]


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
        "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_DISABLE": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"},
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
        import tempfile

        roots = {str(work): ".", str(NOTEBOOK_DIR.parent): "<repo>", sys.prefix: "<venv>",
                 tempfile.gettempdir(): "<tmp>", str(Path.home()): "~"}
        clean_outputs(nb, roots)
        nbformat.write(nb, path)


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks in notebooks/")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_outputs_are_clean(path):
    """What a reader sees on GitHub: outputs without progress bars, stderr or this machine's paths."""
    nb = nbformat.read(path, as_version=4)
    streams = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    assert all(o.get("name") == "stdout" for o in streams), f"{path.name} stores stderr output"
    texts = output_texts(nb)
    assert not [t for t in texts if "\r" in t or re.search(r"\d+%\|", t)], f"{path.name} stores a progress bar"
    assert not [m.group(0) for t in texts for m in [ABSOLUTE_PATH.search(t)] if m], f"{path.name} stores a machine path"


def test_clean_outputs_drops_stderr_and_paths():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="50%|#####     | 1/2 [00:01<00:01]\r"),
                    nbformat.v4.new_output("stream", name="stdout", text="{'loss': '1.7', 'epoch': '0.5'}\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="saved to /tmp/abc/run/model\n"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": "'/tmp/abc/run/x'"}, execution_count=1)]
    nb.cells = [cell]
    clean_outputs(nb, {"/tmp/abc/run": "."})
    assert [o.get("name") for o in cell.outputs] == ["stdout", None]
    assert cell.outputs[0]["text"] == "saved to ./model\n" and cell.outputs[1]["data"]["text/plain"] == "'./x'"
    assert not ABSOLUTE_PATH.search("".join(output_texts(nb)))
