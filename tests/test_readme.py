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


def _commands(block: str) -> list[list[str]]:
    import shlex

    text = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.startswith("tunelab ")]


def test_first_contact_is_english_on_the_default_model_and_its_commands_parse():
    """The first commands a reader meets train and score on the English persona set with the default model
    (no --model_name_or_path), and parse as written; the Chinese 2023 variant comes after, labelled."""
    from tunelab.data import load_dataset_info
    from tunelab.hparams import parse_args

    use = README.split("## Use", 1)[1]
    first = _commands(use.split("```bash", 2)[1].split("```", 1)[0])
    assert [c[:2] for c in first] == [["tunelab", "train"], ["tunelab", "predict"]]
    known = load_dataset_info(REPO / "data")
    stage = {"train": [], "predict": ["--do_predict"]}
    for command in first:
        args = parse_args(command[2:] + stage[command[1]])
        assert args.model.model_name_or_path is None and args.data.dataset.startswith("persona_chat_en_")
        assert args.data.dataset in known
    assert use.index("persona_chat_en_train") < use.index("2023 variant, in Chinese") < use.index("haruhi_persona")
