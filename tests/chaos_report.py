"""Bookkeeping for the chaos scenario: the faults injected, and what the journals and dead letters say after.

Pure functions over plain data (journal rows read with sqlite3, dead letters
drained from RabbitMQ), so the test reads as "inject, wait, judge, print".
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

UNFINISHED = ("PENDING", "RUNNING")


@dataclass
class FaultLog:
    """What was done to the system, and when (seconds since the start of the run)."""

    start: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, str, str]] = field(default_factory=list)

    def add(self, kind: str, detail: str = "") -> None:
        self.rows.append((time.monotonic() - self.start, kind, detail))

    def count(self, kind: str) -> int:
        return sum(1 for _, k, _ in self.rows if k == kind)

    def table(self) -> str:
        lines = [f"{'t (s)':>7}  {'fault':<16} detail", f"{'-' * 7}  {'-' * 16} {'-' * 40}"]
        lines += [f"{t:7.1f}  {kind:<16} {detail}" for t, kind, detail in self.rows]
        return "\n".join(lines)


@dataclass
class JournalRow:
    journal: str
    task_id: str
    task_name: str
    status: str
    attempts: int
    raw_headers: str | None


def read_journal(name: str, path: Path) -> list[JournalRow]:
    """Every row of one journal (read-only, beside a running worker)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT task_id, task_name, status, attempts, raw_headers FROM task_wal").fetchall()
    finally:
        db.close()
    return [JournalRow(name, *r) for r in rows]


def integrity(path: Path) -> str:
    """`PRAGMA integrity_check` of a journal whose worker has stopped."""
    db = sqlite3.connect(path, timeout=30)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def poison_name(raw_headers: str | None, header: str) -> str | None:
    """The marker header a chaos poison message carried, from a DEAD row's saved headers."""
    if not raw_headers:
        return None
    value = (orjson.loads(raw_headers).get("headers") or {}).get(header)
    return value if isinstance(value, str) else None


@dataclass
class Verdict:
    """The numbers the scenario is judged by."""

    rows_by_journal: dict[str, int]
    unfinished: list[tuple[str, str, str]]  # (journal, task id, status)
    ids_in_several_journals: int
    reruns: int  # rows whose attempts exceed what the task needs
    extra_executions: int  # handler runs beyond what each task needs
    duplicated_tasks: int  # tasks run more often than they need, by any cause
    poison_journals: dict[str, int]  # poison name → journals holding its DEAD row


def judge(rows: Iterable[JournalRow], expected_attempts: Mapping[str, int], poison_header: str) -> Verdict:
    """Duplicates and unfinished rows across all journals."""
    by_id: dict[str, list[JournalRow]] = defaultdict(list)
    per_journal: Counter[str] = Counter()
    unfinished, poison = [], Counter[str]()
    for r in rows:
        per_journal[r.journal] += 1
        if r.status in UNFINISHED:
            unfinished.append((r.journal, r.task_id, r.status))
        if r.status == "DEAD" and (name := poison_name(r.raw_headers, poison_header)):
            poison[name] += 1
        elif r.task_id in expected_attempts:
            by_id[r.task_id].append(r)
    several = sum(1 for rs in by_id.values() if len(rs) > 1)
    reruns = sum(1 for rs in by_id.values() for r in rs if r.attempts > expected_attempts[r.task_id])
    extra = {i: sum(r.attempts for r in rs) - expected_attempts[i] for i, rs in by_id.items()}
    return Verdict(dict(per_journal), unfinished, several, reruns, sum(max(0, e) for e in extra.values()),
                   sum(1 for e in extra.values() if e > 0), dict(poison))


def count_dead_letters(messages: Iterable[Any], poison_header: str) -> tuple[Counter[str], Counter[str]]:
    """(copies per poison name, copies per task id of the other dead letters)."""
    poison, tasks = Counter[str](), Counter[str]()
    for m in messages:
        headers = m.headers or {}
        name = headers.get(poison_header)
        if isinstance(name, bytes):
            name = name.decode()
        if isinstance(name, str):
            poison[name] += 1
        else:
            tasks[str(headers.get("x-ecoworker-task-id"))] += 1
    return poison, tasks


def summary(pairs: Iterable[tuple[str, Any]]) -> str:
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in pairs)
