"""The README's quick start runs as written."""

from __future__ import annotations

import pathlib
import re
import textwrap

import pytest

import bpjax as bp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_python_examples_run_in_order():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2, "the README lost its python examples"
    namespace: dict = {}
    for block in blocks:  # a block inside a list item is indented with it
        exec(compile(textwrap.dedent(block), str(README), "exec"), namespace)
    assert isinstance(namespace["cnn"], bp.Serial) and isinstance(namespace["rnn"], bp.Serial)
    assert namespace["report"].ok and namespace["report"].layer_names[0] == "Conv2D"
    assert isinstance(namespace["bw"], bp.Backward)
    assert namespace["report"].first_bad_layer is None


def test_readme_starts_with_the_two_set_up_commands():
    first_block = README.read_text(encoding="utf-8").split("```")[1]
    lines = [line for line in first_block.splitlines()[1:] if line.strip()]
    assert lines == ["pip install . && bpjax check", 'pip install ".[test]" && pytest -q']
