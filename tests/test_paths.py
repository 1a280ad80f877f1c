"""Cache locations, the Hub id of a local model folder, and file modes under the user's umask."""

import json
import os
import stat

import pytest

from tunelab import paths
from tunelab.names import DEFAULT_MODEL_HUB_ID


def test_hub_id_of_local_folders(tmp_path):
    converted = paths.cache_root() / "models" / "SmolLM2-135M-Instruct-72c1cba34924"  # the default's folder
    assert paths.hub_id(converted) == DEFAULT_MODEL_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    assert paths.hub_id(snapshot) == "Qwen/Qwen2.5-0.5B"
    folder = tmp_path / "m"
    folder.mkdir()
    for recorded, expected in (("org/name", "org/name"), (str(tmp_path), None), ("/abs/path", None),
                               ("just-a-name", None), (None, None)):
        (folder / "config.json").write_text(json.dumps({"_name_or_path": recorded}))
        assert paths.hub_id(folder) == expected, recorded
    assert paths.hub_id(tmp_path / "missing") is None and paths.hub_id(None) is None


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_apply_umask_gives_open_and_mkdir_modes(tmp_path, umask_022):
    assert paths.current_umask() == 0o022
    (tmp_path / "d" / "e").mkdir(parents=True)
    for f in (tmp_path / "d" / "w.safetensors", tmp_path / "d" / "e" / "x.json"):
        f.write_text("x")
        f.chmod(0o600)  # what safetensors leaves
    (tmp_path / "d" / "e").chmod(0o700)  # what mkdtemp leaves
    paths.apply_umask(tmp_path / "d")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "d").rglob("*")}
    assert modes == {"w.safetensors": 0o644, "e": 0o755, "x.json": 0o644}
