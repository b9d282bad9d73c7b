"""Under CI a test that needs a tool fails instead of skipping (tests/_required.py)."""

import subprocess
import sys

from _subprocess import ENV, ROOT


def test_a_missing_tool_skips_locally_and_fails_under_ci(tmp_path):
    test = tmp_path / "test_needs_a_tool.py"
    tests = str(ROOT / "tests")
    test.write_text(
        f"import sys\nsys.path.insert(0, {tests!r})\nfrom _required import skip_or_fail\n\n"
        "def test_tool():\n    skip_or_fail('no such tool')\n"
    )
    runs = {}
    for required in ("0", "1"):
        env = {**ENV, "M2CNN_REQUIRE_ALL_TESTS": required}
        runs[required] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )  # fmt: skip
    assert runs["0"].returncode == 0 and "1 skipped" in runs["0"].stdout
    assert runs["1"].returncode == 1 and "required under CI" in runs["1"].stdout
