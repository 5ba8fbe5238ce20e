"""The GitHub Actions gate in docs/ci/deepship-gate.yml, its `run:` lines executed here as GitHub
would run them (bash, from the repository root), on one small model: main's run makes the baseline,
a pull request's run passes the gate against it, a regressed baseline fails it with a summary
naming the variant (issue 19)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "ci" / "deepship-gate.yml"
MODELS = "mlp lstm --methods int8-dynamic --batches 1 --min-time 0.01"


def _steps(wf: dict) -> dict[str, dict]:
    return {s.get("name", s.get("uses", "")): s for s in wf["jobs"]["report"]["steps"]}


def _run(line: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEEPSHIP_MODELS": MODELS}
    return subprocess.run(["bash", "-e", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_workflow_is_valid_and_its_commands_gate_a_regression(tmp_path):
    wf = yaml.safe_load(WORKFLOW.read_text())
    assert set(wf[True]) == {"push", "pull_request"}  # YAML 1.1 reads the key `on` as True
    steps = _steps(wf)
    assert "if" not in steps["report"] and steps["gate"]["if"] == "github.event_name == 'pull_request'"
    assert steps["comment"]["with"]["path"] in steps["gate"]["run"]
    # a checkout: the repository's docs/ci and a venv whose optimize is this interpreter's
    (tmp_path / "docs").mkdir()
    shutil.copytree(ROOT / "docs" / "ci", tmp_path / "docs" / "ci")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    opt = tmp_path / ".venv" / "bin" / "optimize"
    opt.write_text(f"#!/bin/sh\nexec {sys.executable} -m deepship.cli \"$@\"\n")
    opt.chmod(0o755)

    # main: the report becomes the baseline artifact
    r = _run(steps["report"]["run"], tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "report-summary.json").read_text())
    assert summary["models"][0]["model"] == "mlp"
    shutil.copytree(tmp_path / "report", tmp_path / "baseline")

    # a pull request that changes nothing: the gate passes and writes the comment and the page
    r = _run(steps["report"]["run"], tmp_path)
    assert r.returncode == 0, r.stderr
    g = _run(steps["gate"]["run"], tmp_path)
    assert g.returncode == 0, g.stdout + g.stderr
    assert (tmp_path / "gate.md").is_file() and (tmp_path / "report" / "compare.html").is_file()

    # main had a better int8-dynamic: the gate fails naming it, the summary says so
    base = json.loads((tmp_path / "baseline" / "report.json").read_text())
    row = next(v for v in base["models"][0]["variants"] if v["variant"] == "int8-dynamic")
    row["metric"] = row["metric"] + 0.05  # 5 points better than this run
    (tmp_path / "baseline" / "report.json").write_text(json.dumps(base))
    g = _run(steps["gate"]["run"], tmp_path)
    assert g.returncode == 1, g.stdout + g.stderr
    assert "int8-dynamic" in g.stdout + g.stderr and "int8-dynamic" in (tmp_path / "gate.md").read_text()
    assert _run(steps["fail on regressions"]["run"], tmp_path).returncode == 1
