"""README's Python API block, run as written (on tiny models: the dry run the README describes)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _blocks():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_python_api_block_runs_as_written(tmp_path, monkeypatch):
    main, dry = _blocks()
    assert 'models_dir = "ComfyUI/models"' in main and 'write_tiny_models("tiny_models")' in dry
    shutil.copytree(REPO / "assets", tmp_path / "assets")
    monkeypatch.chdir(tmp_path)
    exec(compile(dry, "README dry run", "exec"), {})
    # the dry run's one change, as the README says: models_dir = "tiny_models"
    namespace = {}
    exec(compile(main.replace('models_dir = "ComfyUI/models"', 'models_dir = "tiny_models"'), "README API", "exec"), namespace)
    picture = np.asarray(Image.open(tmp_path / "dog_hat.png"))
    assert picture.shape == (512, 512, 3)
    assert "'dog' → token" in namespace["result"].prompt.describe()
