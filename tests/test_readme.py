"""README.md's set-up commands, and .ci/run running the test command verbatim.

README.md carries exactly two set-up commands, each a single line in a ```bash
block right after an HTML comment marker (``<!-- command:run -->`` and
``<!-- command:test -->``). CI (.ci/run) must run the *test* command as written
there, so the two cannot drift apart.
"""

import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
CI_RUN = REPO_ROOT / ".ci" / "run"


def readme_command(text, name):
    """The single command line of the ```bash block right after <!-- command:NAME -->."""
    lines = text.splitlines()
    marker = f"<!-- command:{name} -->"
    hits = [i for i, line in enumerate(lines) if line.strip() == marker]
    assert len(hits) == 1, f"expected exactly one {marker!r} line in README.md, found {len(hits)}"
    i = hits[0]
    assert i + 1 < len(lines) and lines[i + 1].strip() == "```bash", (
        f"the line right after {marker!r} must open a ```bash block"
    )
    body = []
    for line in lines[i + 2 :]:
        if line.strip() == "```":
            break
        body.append(line)
    else:
        pytest.fail(f"the ```bash block after {marker!r} is never closed")
    commands = [line.strip() for line in body if line.strip()]
    assert len(commands) == 1, f"the block after {marker!r} must hold one command, got {commands}"
    return commands[0]


def ci_print_command(ci_run, name):
    proc = subprocess.run(
        ["bash", str(ci_run), "--print-command", name],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def readme_text():
    return README.read_text(encoding="utf-8")


def test_readme_has_exactly_two_setup_commands(readme_text):
    assert len(re.findall(r"^```bash\s*$", readme_text, flags=re.M)) == 2
    run = readme_command(readme_text, "run")
    test = readme_command(readme_text, "test")
    assert run == (
        "pip install torch==2.13.0 && pip install -e '.[examples]' && python examples/quickstart.py"
    )
    assert test == "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest"
    assert (REPO_ROOT / "examples" / "quickstart.py").is_file()


def test_readme_keeps_benchmarks_section(readme_text):
    assert re.search(r"^## Benchmarks\s*$", readme_text, flags=re.M)


def test_ci_run_is_an_executable_bash_script():
    mode = CI_RUN.stat().st_mode
    assert mode & stat.S_IXUSR, ".ci/run must be executable"
    text = CI_RUN.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text


@pytest.mark.parametrize("name", ["test", "run"])
def test_ci_run_extracts_the_readme_command(readme_text, name):
    assert ci_print_command(CI_RUN, name) == readme_command(readme_text, name)


def _fake_repo(tmp_path, readme):
    """A repository containing only the real .ci/run and the given README."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(CI_RUN, repo / ".ci" / "run")
    (repo / "README.md").write_text(readme, encoding="utf-8")
    return repo


def _run_ci(repo, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(CI="true", TMPDIR=str(tmp_path), PYTHON=sys.executable)
    return subprocess.run(
        ["bash", ".ci/run"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


def test_ci_run_runs_the_extracted_command_in_a_fresh_venv(tmp_path):
    # The test command of this fake README records where and how it ran, then
    # exits 3: .ci/run must run exactly it, in a new venv, from the repo root,
    # and exit with its status.
    command = (
        'printf "%s\\n" "$VIRTUAL_ENV" "$(command -v python)" "$MPLBACKEND" "$(pwd)" '
        "> ran.txt; exit 3"
    )
    readme = (
        "# fake\n\n<!-- command:run -->\n```bash\necho not-this-one > wrong.txt\n```\n\n"
        f"<!-- command:test -->\n```bash\n{command}\n```\n"
    )
    repo = _fake_repo(tmp_path, readme)
    assert ci_print_command(repo / ".ci" / "run", "test") == command

    proc = _run_ci(repo, tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert command in proc.stdout, "the command must be printed before it runs"
    assert not (repo / "wrong.txt").exists()
    venv, python, backend, cwd = (repo / "ran.txt").read_text().splitlines()
    assert pathlib.Path(venv).parent.parent == tmp_path, venv  # $TMPDIR/<workdir>/venv
    assert python == str(pathlib.Path(venv) / "bin" / "python")
    assert backend == "Agg"
    assert pathlib.Path(cwd).resolve() == repo.resolve()
    # The temporary venv is removed afterwards.
    assert not pathlib.Path(venv).exists()


def test_ci_run_refuses_a_readme_without_a_test_command(tmp_path):
    repo = _fake_repo(tmp_path, "# no markers here\n\n```bash\necho hi\n```\n")
    proc = _run_ci(repo, tmp_path)
    assert proc.returncode != 0
    assert "marker not found" in proc.stderr


# --------------------------------------------------------------------------- contents

RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"


def test_readme_starts_with_what_it_does_and_the_two_commands(readme_text):
    lines = readme_text.splitlines()
    run = lines.index("<!-- command:run -->")
    test = lines.index("<!-- command:test -->")
    benchmarks = lines.index("## Benchmarks")
    assert run < test < benchmarks
    assert "Natural-gradient variational inference" in "\n".join(lines[:run])
    assert run < 40, "the two commands belong near the top of the README"


def test_readme_local_links_and_images_exist(readme_text):
    targets = re.findall(r"\]\(([^)\s]+)\)", readme_text)
    local = [t for t in targets if not re.match(r"^[a-z]+://", t) and not t.startswith("#")]
    assert local
    missing = [t for t in local if not (REPO_ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to missing paths: {missing}"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme_text)
    assert images and all(i.endswith(".png") for i in images)
    for link in ("docs/getting_started.rst", "examples/", "docs/examples/index.rst"):
        assert f"]({link})" in readme_text, f"README should link to {link}"


def _table_rows(text, first_header_cell):
    """Rows (lists of stripped cells) of the first markdown table whose header starts
    with ``first_header_cell``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header_cell:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))])
            return rows
    raise AssertionError(f"no table starting with {first_header_cell!r}")


def test_readme_benchmark_tables_match_results_md(readme_text):
    """The README's benchmark numbers are those of benchmarks/RESULTS.md, from the run it
    names. If RESULTS.md is regenerated, copy the new numbers (and date) into README.md."""
    results = RESULTS.read_text(encoding="utf-8")
    date = re.search(r"on (\d{4}-\d{2}-\d{2}) \d{2}:\d{2} UTC, `--quick` settings", results)
    assert date, "benchmarks/RESULTS.md lacks its date line"
    assert f"`python benchmarks/run_all.py --quick` on {date.group(1)}" in readme_text, (
        "README's benchmark tables name another RESULTS.md run than the committed one")

    # reference posteriors: model -> {optimizer: (max err, sd ratio)}
    ref = {}
    for r in _table_rows(results, "model"):
        label = "ng" if r[3].startswith("NaturalGradient") else "adam"
        ref.setdefault(r[0], {})[label] = (r[6], r[7])
    rows = _table_rows(readme_text, "model")
    assert len(rows) == len(ref), "README should list every reference posterior"
    for r in rows:
        model = r[0].replace("\\*", "")
        assert model in ref, model
        assert (r[2], r[3]) == ref[model]["ng"], model
        if r[4]:
            assert (r[4], r[5]) == ref[model]["adam"], model
        else:
            assert "adam" not in ref[model], model

    # convergence: (problem, guide) -> natural gradient's and the best Adam's numbers
    conv = {}
    for r in _table_rows(results, "problem"):
        if len(r) < 10:
            continue
        key = (r[0], r[1])
        if r[2].startswith("NaturalGradient"):
            conv.setdefault(key, {})["ng"] = (r[4], r[6], r[9].split(" ")[0])
        elif "(best)" in r[2]:
            conv.setdefault(key, {})["adam"] = r[4]
    rows = _table_rows(readme_text, "problem")
    assert len(rows) == len(conv)
    for r in rows:
        key = (r[0], r[1])
        steps, gap, verdict = conv[key]["ng"]
        assert (r[2], r[3], r[4]) == (steps, gap, conv[key]["adam"]), key
        assert r[5].strip("*") == verdict, key

    # the cost targets: the README must not claim more than RESULTS.md shows
    passed, total = map(int, re.search(r"\*\*Targets: (\d+)/(\d+) rows pass\.\*\*",
                                       results).groups())
    if passed == 0:
        assert f"all {total} rows FAIL" in readme_text
    else:
        assert f"{passed} of {total} rows pass" in readme_text

    # the GGN issue's targets: steps to 1 nat of the default, and the cost ratio
    section = results[results.index("## GGN targets"):]
    ggn = {r[0]: r[2] for r in _table_rows(section, "problem")
           if r[1] == "NaturalGradient (default)"}
    german = next(v for k, v in ggn.items() if k.startswith("german_credit"))
    poisson = next(v for k, v in ggn.items() if k.startswith("randhie"))
    assert f"optimal full-rank ELBO in {german} steps" in readme_text
    assert f"in {poisson}; no Adam" in readme_text
    ratio = re.search(r"whole step < 10x Adam\): PASS, ratio ([0-9.]+)", results).group(1)
    assert f"costs {ratio} Adam steps" in readme_text


def test_top_level_holds_only_what_the_design_card_fixes():
    """The design card fixes the top level (package, examples, tests, docs, setup.cfg,
    pyproject.toml; with README, licence, CI and benchmarks): a stray log or scratch
    script committed there (one was, in 0afe113) fails here."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    allowed = {"pyro_natgrad", "examples", "tests", "docs", "benchmarks", ".ci",
               "setup.cfg", "pyproject.toml", "README.md", "LICENSE", ".gitignore"}
    stray = sorted({path.split("/")[0] for path in listed} - allowed)
    assert not stray, f"files outside the design card's top level: {stray}"
