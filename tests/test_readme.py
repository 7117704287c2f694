"""The README's quick start runs as written."""

from __future__ import annotations

import pathlib
import re

import bpjax as bp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["report"].ok
    assert isinstance(namespace["bw"], bp.Backward)
    assert namespace["report"].first_bad_layer is None


def test_readme_starts_with_the_two_set_up_commands():
    first_block = README.read_text(encoding="utf-8").split("```")[1]
    lines = [line for line in first_block.splitlines()[1:] if line.strip()]
    assert lines == ["pip install . && bpjax check", 'pip install ".[test]" && pytest -q']
