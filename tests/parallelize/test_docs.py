"""docs/parallelize.md's complete example is the script in docs/examples, and it runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "examples" / "parallelize_custom.py"


def test_the_doc_shows_the_script():
    doc = (ROOT / "docs" / "parallelize.md").read_text()
    block = re.search(
        r"<!-- example: docs/examples/parallelize_custom.py -->\n```python\n(.*?)```", doc, re.S
    )
    assert block is not None and block.group(1) == SCRIPT.read_text()


def test_the_script_runs_on_two_ranks_and_equals_one_process():
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    assert "equal to one process: yes" in run.stdout
    assert "blocks.0.time" in run.stdout and "rank 1: sent" in run.stdout
