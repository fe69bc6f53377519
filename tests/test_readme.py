"""The README points at code that exists."""
import importlib
import re
from pathlib import Path

import ptl_common

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))  # the flat modules


def module(name: str):
    return ptl_common.import_evaluate() if name == "evaluate" else importlib.import_module(name)


def test_every_function_the_paper_to_code_table_names_exists():
    text = (ROOT / "README.md").read_text()
    table = text.split("## Paper → code", 1)[1].split("\n## ", 1)[0]
    named = re.findall(rf"`({'|'.join(MODULES)})\.(\w+)`", table)
    assert len(named) >= 20, "the table names the functions"
    missing = [f"{m}.{f}" for m, f in named if f != "py" and not hasattr(module(m), f)]  # `ptl.py`: a file
    assert not missing, missing
