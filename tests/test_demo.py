"""The README's main job, `python -m deploy.demo`, run end to end against the local stack."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg

from tests.workers import process_alive

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = Path("/tmp/ecoworker-demo")
TASK_TYPES = {"upload_to_s3", "process_image", "classify_waste_image", "chat_with_llm", "extract_text_from_image"}


def demo(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.demo", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


async def fetch_results(dsn: str, ids: list[str]) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT task_id, task_name, status, result::text AS result "
                                "FROM task_results WHERE task_id = ANY($1::text[])", ids)
    finally:
        await conn.close()
    return {r["task_id"]: r for r in rows}


def test_short_demo_succeeds_and_down_stops_it(stack_env: dict[str, str]) -> None:
    """`deploy.demo --short` exits 0 with every task type SUCCESS in task_results; `--down` ends its processes."""
    env = {**os.environ, **stack_env, "PYTHONPATH": str(REPO)}
    for name in ("OPENAI_API_KEY", "OPENAI_API_KEY_FILE", "OPENAI_BASE_URL"):
        env.pop(name, None)  # the deterministic stand-in, never the paid API
    run = demo("--short", env=env, timeout=240)
    pids = [int(line.split()[1]) for line in (DEMO_DIR / "pids").read_text().splitlines()] \
        if (DEMO_DIR / "pids").exists() else []
    try:
        assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
        assert "All sample tasks succeeded" in run.stdout
        last = json.loads((DEMO_DIR / "last-run.json").read_text())
        ids = [t["id"] for t in last["tasks"]]
        assert last["ok"] is True and len(ids) == len(set(ids))
        assert {"storage", "ai"} <= set(last["pids"]) and all(process_alive(p) for p in last["pids"].values())

        rows = asyncio.run(fetch_results(stack_env["POSTGRES_DSN"], ids))
        assert set(rows) == set(ids), "some published tasks are missing from task_results"
        assert {r["task_name"] for r in rows.values()} == TASK_TYPES
        assert {r["status"] for r in rows.values()} == {"SUCCESS"}
        results = [(r["task_name"], json.loads(r["result"])) for r in rows.values()]
        big = [r for name, r in results if name == "upload_to_s3" and r["size"] > 8 * 1024 * 1024]
        assert big and all("-" in r["etag"] for r in big), "the > 8 MiB file did not go up as a multipart upload"
        ocr = [r for name, r in results if name == "extract_text_from_image"]
        assert all(r["engine"] == "tesseract" and "RECYCLING CENTRE" in r["text"] for r in ocr)
    finally:
        down = demo("--down", env=env, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert pids and not [p for p in pids if process_alive(p)], "demo processes still running after --down"
    assert not (DEMO_DIR / "pids").exists()
