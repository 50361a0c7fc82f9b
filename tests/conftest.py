"""Fixtures shared by several test modules."""

import json
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: small models run faster without thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS thread for the module: the test machine's cores are shared, and linear algebra
    on small matrices runs faster without oversubscription."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def assert_notebook_outputs_cleared(path):
    """The committed notebook is valid, runs the ``python3`` kernel and holds no outputs."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    return nb


def execute_notebook(path, workdir, checks: str, timeout: int):
    """Run a notebook with a final ``checks`` cell appended; returns (its JSON report, PNG outputs).

    The checks cell must print one JSON line holding ``"prefix": sys.prefix``; the kernel must
    have run in this interpreter's environment (the installed package, not another one), and the
    notebook must not write files into ``workdir``.
    """
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(checks))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    report = json.loads(out.strip().splitlines()[-1])
    assert Path(report["prefix"]).resolve() == Path(sys.prefix).resolve()
    assert not list(Path(workdir).iterdir()), "the notebook must not write files"
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    return report, images
