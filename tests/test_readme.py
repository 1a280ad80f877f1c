"""README's claims that can rot: the layout names every module of the package, and every example file
its commands use ships."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_layout_names_every_module_and_subpackage():
    layout = README.split("## Layout", 1)[1].split("```", 2)[1]
    # a line names a module by file (`methods.py`) or folder (`methods/`): either spelling counts
    listed = {name.removesuffix(".py").rstrip("/") for name in re.findall(r"^  (\S+)", layout, flags=re.M)}
    package = REPO / "tunelab"
    modules = {p.stem for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    subpackages = {p.parent.name for p in package.glob("*/__init__.py")}
    missing = sorted((modules | subpackages) - listed)
    assert not missing, f"README's layout omits {missing}"


def test_every_example_file_the_readme_uses_ships():
    used = set(re.findall(r"examples/[\w./-]+\.(?:yaml|json)", README))
    assert "examples/train_lora.yaml" in used
    assert [u for u in sorted(used) if not (REPO / u).is_file()] == []
    assert "cfg.yaml" not in README  # a config the README's commands name but nothing ships
