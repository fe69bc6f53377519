"""The README points at code that exists."""
import re
from pathlib import Path

import grpo
import ptl
import ptl_common
import recover

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"ptl": ptl, "recover": recover, "grpo": grpo, "evaluate": ptl_common.import_evaluate(),
           "ptl_common": ptl_common}


def test_every_function_the_paper_to_code_table_names_exists():
    text = (ROOT / "README.md").read_text()
    table = text.split("## Paper → code", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(ptl|recover|grpo|evaluate|ptl_common)\.(\w+)`", table)
    assert len(named) >= 20, "the table names the functions"
    missing = [f"{m}.{f}" for m, f in named if f != "py" and not hasattr(MODULES[m], f)]  # `ptl.py`: a file
    assert not missing, missing
