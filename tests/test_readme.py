"""The README's main command stays true: its config exists, its options parse, and it runs end to end (in miniature)."""

import re
import shlex
from pathlib import Path

import pytest

from seqpe_nd.tasks.cli import main

ROOT = Path(__file__).resolve().parents[1]


def main_command() -> list[str]:
    """Arguments of the ``seqpe-nd`` call in the README's first shell block (the main job)."""
    block = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README.md has no ```bash block"
    line = block.group(1).strip()
    assert line.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && "), line
    call = line.split("&& ")[-1]
    words = shlex.split(call)
    assert words[0] == ".venv/bin/seqpe-nd", call
    return words[1:]


@pytest.mark.slow
def test_readme_main_command_runs_in_miniature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = main_command()
    assert args[0] == "compare" and (ROOT / args[1]).is_file()
    out = args.index("--out")
    args[out + 1] = str(tmp_path / "smoke")  # keep the user's runs/ untouched
    args[args.index("--jobs") + 1] = "1"  # spawned workers are covered in tests/tasks/test_lm.py
    monkeypatch.chdir(ROOT)
    tiny = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--lengths", "128", "256", "--max-tokens", "512"]
    assert main(args + tiny) == 0
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (tmp_path / "smoke" / name).is_file()
