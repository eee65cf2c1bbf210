"""The README's Python snippets, run in order in one fresh process, so they cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_readme_snippets_run(tmp_path, mnist_dir):
    snippets = readme_snippets()
    assert len(snippets) == 5
    script = "\n".join(f"print('--- snippet {i}')\n{code}" for i, code in enumerate(snippets, 1))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README snippet failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "--- snippet 5" in result.stdout and "devices 8 test accuracy" in result.stdout
