"""The GPU session scripts' bookkeeping, on the CPU: what comes back from a device call must say what ran.

``scripts/gpu_chain.sh`` runs several ``gpu_session.sh`` steps under one deadline and packs each step's folder
(the device returns at most 8 files). A step that failed must come back with its exit status, a step the
deadline left no time for must say so, and neither may stop the steps after it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")


def _chain(tmp_path: Path, seconds: int, *steps: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_chain.sh"), str(seconds), *steps], env=env,
                          capture_output=True, text=True, timeout=120)


def _chain_txt(tmp_path: Path, step: str) -> str:
    with tarfile.open(tmp_path / "out" / f"{step}.tgz") as packed:
        return packed.extractfile(f"{step}/chain.txt").read().decode()


def test_a_failing_step_comes_back_with_its_exit_status_and_the_next_step_still_runs(tmp_path):
    done = _chain(tmp_path, 100, "no-such-step", "another-bad-step")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["another-bad-step.tgz", "no-such-step.tgz"]
    for step in ("no-such-step", "another-bad-step"):
        assert _chain_txt(tmp_path, step).startswith(f"{step}: exit 2 after "), _chain_txt(tmp_path, step)
        with tarfile.open(tmp_path / "out" / f"{step}.tgz") as packed:
            output = packed.extractfile(f"{step}/output.txt").read().decode()
        assert f"unknown step {step}" in output


def test_a_step_the_deadline_leaves_no_time_for_says_so(tmp_path):
    _chain(tmp_path, 5, "sweep-fp8")
    assert "sweep-fp8: not run" in _chain_txt(tmp_path, "sweep-fp8")


def test_a_step_limit_below_its_own_wins(tmp_path):
    """``STEP_LIMIT_S`` caps every inner timeout of gpu_session.sh (the chain's deadline reaches the step)."""
    script = (ROOT / "scripts" / "gpu_session.sh").read_text()
    limit = script[script.index("limit() {"):].splitlines()[0]
    for given, own, want in ((None, 540, 540), (100, 540, 100), (900, 540, 540)):
        env = {key: value for key, value in os.environ.items() if key != "STEP_LIMIT_S"}
        if given is not None:
            env["STEP_LIMIT_S"] = str(given)
        got = subprocess.run(["bash", "-c", f"{limit}; limit {own}"], env=env, capture_output=True, text=True)
        assert got.stdout.strip() == str(want), (given, own, got.stdout, got.stderr)


@pytest.mark.parametrize("missing, named", [("third-party/fmt/include", "third-party/fmt/include"),
                                             ("scripts/generate_pyi.py", "scripts/generate_pyi.py")])
def test_build_deepgemm_names_what_a_copy_of_the_sources_lacks(tmp_path, missing, named):
    """A DeepGEMM copy without its submodules' headers, or without the script its setup.py imports, is refused
    before the build starts, naming the path."""
    src = tmp_path / "DeepGEMM"
    for folder in ("third-party/cutlass/include/cutlass", "third-party/cutlass/include/cute", "third-party/fmt/include",
                   "scripts"):
        (src / folder).mkdir(parents=True)
    (src / "scripts" / "generate_pyi.py").write_text("")
    target = src / missing
    if target.is_dir():
        target.rmdir()
    else:
        target.unlink()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build_deepgemm.sh"), str(src)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and named in done.stderr, done.stderr


def test_a_failure_is_written_down_the_moment_it_happens(tmp_path):
    """gpu_session's tests write each failure to $OUT/failures.txt as it happens (tests/failure_log.py): a run the
    deadline kills before pytest's summary still says which test failed and why."""
    (tmp_path / "test_probe.py").write_text(
        "def test_passes():\n    assert True\n\n"
        "def test_fails():\n    assert 1 + 1 == 3, 'the reason'\n\n"
        "def test_hangs():\n    import time\n    time.sleep(600)\n")
    failures = tmp_path / "failures.txt"
    env = dict(os.environ, FX_INDEXCACHE_TEST_FAILURES=str(failures), PYTHONPATH=str(ROOT / "tests"))
    with pytest.raises(subprocess.TimeoutExpired):  # killed in the last test, as a deadline would
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "failure_log",
                        str(tmp_path / "test_probe.py")], env=env, cwd=tmp_path, capture_output=True, timeout=15)
    written = failures.read_text()
    assert "FAILED test_probe.py::test_fails (in call)" in written and "the reason" in written, written
    assert "test_passes" not in written and "test_hangs" not in written
