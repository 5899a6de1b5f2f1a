"""README's drop-in example is the code the test suite runs (tests/integration/dropin_app.py)."""

from __future__ import annotations

import re

from tests.subproc import ROOT

HEADING = "### Adding compression to an existing Flower app"
END = "# ---- end of the example"


def _readme_example() -> str:
    section = (ROOT / "README.md").read_text().split(HEADING, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "README's drop-in section has no python block"
    return match.group(1)


def _app_example() -> str:
    text = (ROOT / "tests" / "integration" / "dropin_app.py").read_text()
    after_docstring = text.split('"""', 2)[2]
    return after_docstring.split(END, 1)[0].strip() + "\n"


def test_readme_shows_the_whole_dropin_app_verbatim() -> None:
    assert _readme_example() == _app_example()


def test_the_example_defines_every_name_it_uses() -> None:
    code = compile(_readme_example(), "README.md", "exec")
    names: dict[str, object] = {}
    exec(code, names)  # defines the apps; nothing runs until Flower calls them
    for name in ("client", "server", "train", "main", "make_model", "local_data"):
        assert name in names, name
