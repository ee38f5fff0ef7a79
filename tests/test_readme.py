"""The README's API tour runs as written."""

import pathlib
import re

import pytest

pytestmark = pytest.mark.timeout(300)


def test_api_tour_runs(capsys):
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    tour = readme.split("## A tour of the API", 1)[1]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "total:" in out and "all-reduce@model" in out


def test_own_model_section_runs(capsys):
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Use jaxtp layers in your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert "P(None, 'model', None)" in capsys.readouterr().out
