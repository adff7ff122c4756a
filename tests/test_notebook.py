"""``notebooks/rome_demo.ipynb`` runs top to bottom (any cell error fails the suite)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "rome_demo.ipynb"


def test_rome_demo_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager

    # jupyter_client runs a kernelspec whose command is "python" with sys.executable, so the
    # kernel is this interpreter (the venv's), whichever python3 kernelspec it finds.
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] in ("python", "python3", sys.executable), spec.argv
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))

    work = tmp_path / "rome_demo.ipynb"
    shutil.copy(NOTEBOOK, work)
    nb = nbformat.read(work, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    outputs = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "[ROME] Steve Jobs was the founder of -> 'Microsoft'" in outputs
    assert "identical to the in-memory edit: True" in outputs
    assert "original model restored: True" in outputs
    assert "[original] Steve Jobs was the founder of" in outputs
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the causal trace heatmap was not drawn"
