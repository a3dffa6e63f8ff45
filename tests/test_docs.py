"""The Sphinx site builds with warnings treated as errors."""

import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",  # every warning is an error
        "-b",
        "html",
        "-d",
        str(tmp_path / "doctrees"),
        str(REPO_ROOT / "docs"),
        str(tmp_path / "html"),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(proc.stdout)
        print(proc.stderr, file=sys.stderr)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stderr}"
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "maths.html").is_file()
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in ("fisher_information", "fisher_operator", "register_fisher", "FisherOperator"):
        assert f'id="pyro_natgrad.fisher.{name}"' in api, f"{name} missing from the API page"
