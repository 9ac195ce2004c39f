"""The benchmark scripts still run: each is started as `make bench-*` starts it, at a tiny size.

These are smoke runs, not speed checks (speed is never asserted in a test): they
fail when a refactor of the journal or the sink breaks a bench script, which
would otherwise only show the next time someone runs `make bench`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]


def run_bench(module: str, env: dict[str, str], *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_bench_journal_reports_every_mode(tmp_path: Path) -> None:
    """bench_journal ingests every mode's rows and reports a rate and a ratio for each."""
    out = tmp_path / "journal.json"
    run_bench("bench.bench_journal", dict(os.environ), "--rows", "400", "--single-rows", "20",
              "--repeat", "1", "--json", str(out))
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    modes = {r["mode"]: r for r in report["results"]}
    assert {"group x1000", "group x500", "group x100", "single"} <= set(modes)
    assert all(r["median_rows_per_s"] > 0 for r in modes.values())
    assert set(report["ratios_group_over_single"]) >= {"group x1000", "group x500", "group x100"}


def test_bench_sink_drains_and_runs_the_per_row_baseline(stack_env: dict[str, str], tmp_path: Path) -> None:
    """bench_sink drains its journal with the real Sink, ships the baseline row by row and the
    PostgreSQL-only ceiling; its drain checks (every row in PostgreSQL) pass, so the figures
    come from complete runs."""
    out = tmp_path / "sink.json"
    env = {**os.environ, "POSTGRES_DSN": stack_env["POSTGRES_DSN"]}
    run_bench("bench.bench_sink", env, "--rows", "1200", "--baseline-rows", "30", "--repeat", "1",
              "--json", str(out))
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    sink, per_row, ceiling = report["results"]
    assert sink["rows"] == 1200 and sink["rows_per_s"] > 0
    assert per_row["rows"] == 30 and per_row["rows_per_s"] > 0
    assert ceiling["rows"] == 1200 and ceiling["rows_per_s"] > 0
    assert report["ratio_sink_over_per_row"] > 0
