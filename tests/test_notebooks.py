"""The notebooks are stored without outputs and end with a check (``make notebooks`` runs them)."""

import json
import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ("01_quickstart.ipynb", "02_grpo_custom_reward.ipynb", "03_sharding_meshes.ipynb",
            "04_bring_your_own_hf_model.ipynb")


def _notebooks():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_tutorials_exist():
    assert set(EXPECTED) <= {p.name for p in _notebooks()}


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; run "
                       f"`python notebooks/run_all.py --strip {path}`")
    # CI executes the notebooks; the last code cell is the check that makes that a test.
    assert code and "assert " in "".join(code[-1]["source"]), f"{path.name} ends without a check"
