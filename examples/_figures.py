"""The figures of examples/README.md come from the examples themselves: a full run writes its results to
``examples/results/<name>.json`` and the table rendered from them between the markers
``<!-- figures:<name> -->`` and ``<!-- /figures:<name> -->`` of examples/README.md (both written atomically);
tests/test_examples.py checks that every block equals the rendering of its JSON."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def markers(name: str) -> tuple[str, str]:
    return f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"


def block(readme_text: str, name: str) -> str:
    """The text between the markers of ``name`` (ValueError if they are missing)."""
    start, end = markers(name)
    i, j = readme_text.find(start), readme_text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"README: expected the markers {start} ... {end}, found none")
    return readme_text[i + len(start):j].strip("\n")


def publish(name: str, results: dict[str, Any], render: Callable[[dict[str, Any]], str], *,
            readme: Path = README, results_dir: Path = RESULTS) -> None:
    """Write ``results`` to results_dir/<name>.json and ``render(results)`` between the markers of ``name``
    in ``readme``. The JSON is read back before rendering, so the README holds exactly what renders from it."""
    text = json.dumps(results, indent=1, sort_keys=True) + "\n"
    _atomic_write(results_dir / f"{name}.json", text)
    body = render(json.loads(text))
    old = readme.read_text()
    start, end = markers(name)
    block(old, name)  # the markers must exist
    i, j = old.index(start) + len(start), old.index(end)
    _atomic_write(readme, old[:i] + "\n" + body.strip("\n") + "\n" + old[j:])


def load(name: str, results_dir: Path = RESULTS) -> dict[str, Any]:
    return json.loads((results_dir / f"{name}.json").read_text())
