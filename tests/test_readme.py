"""The README's first two commands are the ones CI and a fresh machine run."""

import re

from helpers import REPO_ROOT


def _readme_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S)


def test_first_command_installs_and_captions_the_examples():
    first = _readme_commands()[0]
    assert first.startswith("pip install -e .") and "captioner caption demo/examples" in first
    assert (REPO_ROOT / "demo" / "examples").is_dir()


def test_ci_runs_the_readme_test_command_with_shared_data_required():
    test_command = _readme_commands()[1]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert "CAPTIONER_REQUIRE_SHARED_DATA=1" in ci
