"""The real-CT fixture rule (tests/conftest.py): a plain clone skips, saying why; CI cannot skip.

Runs a one-test file in a pytest subprocess with the fixture pointed somewhere empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDS_FIXTURE = (
    "def test_needs_it(real_ct_dir):\n    assert (real_ct_dir / 'ct.nii.gz').is_file()\n"
)


def run_pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_it.py").write_text(NEEDS_FIXTURE)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VCTMAE_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120,
    )  # fmt: skip


def test_missing_fixture_skips_with_its_reason(tmp_path):
    done = run_pytest(tmp_path, VCTMAE_REAL_CT=str(tmp_path / "nowhere"))
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout and "real-CT fixture not found" in done.stdout
    assert "VCTMAE_REAL_CT" in done.stdout


def test_ci_turns_the_skip_into_a_failure(tmp_path):
    done = run_pytest(
        tmp_path, VCTMAE_REAL_CT=str(tmp_path / "nowhere"), VCTMAE_REQUIRE_REAL_CT="1"
    )
    assert done.returncode != 0 and "forbids skipping" in done.stdout, done.stdout


def test_the_fixture_is_found_where_ci_has_it(tmp_path, real_ct_dir):
    done = run_pytest(tmp_path, VCTMAE_REAL_CT=str(real_ct_dir), VCTMAE_REQUIRE_REAL_CT="1")
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout
