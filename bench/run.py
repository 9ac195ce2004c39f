"""`make bench`: throughput, latency and memory of ecoworker against its ceilings, in one run.

    python -m bench.run [--n 20000] [--repeats 3] [--full | --quick] [--scale-repeats 1]
                        [--only raw,ecoworker,…] [--profile [--py-spy PATH]]

`make bench` is `--full --scale-repeats 3`.

Measures, on the local stack (deploy/dev/services.sh):

1. raw       a bare aio-pika consumer that only acks: the ceiling (bench/raw_consumer.py)
2. ecoworker `ecoworker run` from process start until every result is in PostgreSQL
3. celery    the seed's design: Celery + per-task SQLite commits (bench/celery_seed.py),
             best of prefork -c 2, threads -c 8 and solo
4. latency   delivery-to-ack p50/p99 at a steady 100 tasks/s (bench/latency.py)
5. scale     ecoworker tasks/s at 10k and 50k tasks (and 100k with --full), medians of
             --scale-repeats rounds

Repeats of 1-3, and of 5, are interleaved round by round, so a burst of background
load hits all alike; ratios are taken within this run only. Prints a table and
writes bench/results/bench-<timestamp>.json and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from bench import celery_seed, common, latency, raw_consumer

STEPS = ("raw", "ecoworker", "celery", "latency", "scale")
EXTRAS = ("journal", "sink")  # other engineers' micro-benchmarks, run when asked and present
CELERY_MODES = (("prefork", 2), ("threads", 8), ("solo", 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000, help="tasks per throughput run (default 20000)")
    p.add_argument("--repeats", type=int, default=3, help="runs of raw/ecoworker/celery; medians (3)")
    p.add_argument("--scale-repeats", type=int, default=1, help="runs per scale point (1)")
    p.add_argument("--full", action="store_true", help="scale up to 100,000 tasks (adds a 100k run)")
    p.add_argument("--quick", action="store_true", help="small N, one repeat: a smoke run")
    p.add_argument("--only", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS + EXTRAS)}")
    p.add_argument("--profile", action="store_true",
                   help="one extra ecoworker run under py-spy; top self-time functions in the report")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy")
    p.add_argument("--keep-tmp", action="store_true", help="keep .bench-tmp/<run> (journals, logs)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(STEPS + EXTRAS)
    if unknown:
        p.error(f"--only: unknown step(s) {', '.join(sorted(unknown))}")
    if args.profile and not (args.py_spy and shutil.which(args.py_spy)):
        p.error("--profile needs py-spy: python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy, "
                "then --py-spy /tmp/pyspy/bin/py-spy")
    if args.quick:
        args.n, args.repeats = min(args.n, 2000), 1
    args.scale_ns = [1000, 4000] if args.quick else [10_000, 50_000, *([100_000] if args.full else [])]
    args.latency_seconds = 3.0 if args.quick else 10.0
    return args


# ---------------------------------------------------------------- ecoworker end to end


async def measure_ecoworker(ctx: common.Ctx, n: int, py_spy: str | None = None) -> dict[str, Any]:
    """Publish `n` noop tasks, start `ecoworker run`, wait until `n` rows are in task_results."""
    import aio_pika
    import asyncpg


    queue = ctx.queue("eco")
    wal, port = ctx.tmp / f"{queue}.db", common.free_port()
    conn = await aio_pika.connect(ctx.amqp_url)
    pg = await asyncpg.connect(ctx.pg_dsn)
    try:
        channel = await conn.channel(publisher_confirms=True)
        publish_s = await common.prepublish_noops(channel, queue, n)
        await pg.execute("TRUNCATE task_results")
        proc = common.start_ecoworker(ctx, queue, wal, port, ctx.tmp / f"{queue}.log")
        spy_out = common.RESULTS / f"profile-{queue}.txt"
        spy, samples = None, None
        rss: list[tuple[float, int]] = []  # (time, VmRSS KiB)
        pss_kb = 0
        done = None
        deadline = time.monotonic() + 60 + n / 100
        try:
            spy = common.spy_attach(py_spy, proc.pid, spy_out) if py_spy else None
            while time.monotonic() < deadline:
                await asyncio.sleep(common.POLL)
                # the worker and its children (the journal writer process when it is on):
                # their sum is what the pod holds
                rss.append((time.time(), common.tree_kb(proc.pid, "VmRSS")))
                pss_kb = max(pss_kb, common.tree_kb(proc.pid, "Pss"))
                if not proc.alive:
                    raise RuntimeError(f"ecoworker exited {proc.popen.returncode}:\n{proc.tail()}")
                if await pg.fetchval("SELECT count(*) FROM task_results") >= n:
                    done = time.time()
                    break
            hwm_kb = common.tree_kb(proc.pid, "VmHWM")  # each process's peak, summed: an upper bound
            own_hwm_kb = common.proc_status_kb(proc.pid, "VmHWM")
            cpu_s = common.tree_cpu_seconds(proc.pid)
            children = common.child_names(proc.pid)  # they live as long as the worker: read once
            # read before the worker stops: its shutdown flush may re-ship (upsert) rows, moving synced_at
            synced = await pg.fetchrow("SELECT extract(epoch FROM max(synced_at))::float8 AS last, "
                                       "count(*) FILTER (WHERE status = 'SUCCESS') AS ok FROM task_results")
        finally:
            samples = common.spy_detach(spy, spy_out) if spy else None
            exit_code = proc.stop(timeout=60)
        if done is None:
            raise RuntimeError(f"ecoworker did not ship {n} results in time:\n{proc.tail()}")
        reshipped = await pg.fetchval("SELECT count(*) FROM task_results WHERE synced_at > to_timestamp($1)",
                                      synced["last"])
        left = await common.queue_depth(channel, queue)
    finally:
        await conn.close()
        await pg.close()
    first, last_in, first_run, last_done, rows = common.journal_query(
        wal, "SELECT min(created_at), max(created_at), min(started_at), max(completed_at), count(*) "
             "FROM task_wal")[0]
    out = {
        "n": n, "publish_rate": n / publish_s, "rows_in_journal": rows, "success_in_postgres": synced["ok"],
        "left_in_queue": left, "exit_code": exit_code, "rows_reshipped_at_shutdown": reshipped,
        "seconds_from_spawn": done - proc.started, "seconds_from_first_delivery": done - first,
        "rate": n / (done - proc.started), "rate_warm": n / (done - first),
        "cpu_ms_per_1000": cpu_s * 1e6 / n,  # the worker's tree, start-up included
        "peak_rss_mb": max([hwm_kb, *(kb for _, kb in rss)]) / 1024,
        "worker_peak_rss_mb": own_hwm_kb / 1024, "peak_pss_mb": pss_kb / 1024, "children": sorted(children),
        "rss_at_first_delivery_mb": max((kb for t, kb in rss if t <= first), default=0) / 1024,
        "phases_seconds": {
            "startup (spawn → first delivery journaled)": first - proc.started,
            "ingest (first → last delivery journaled)": last_in - first,
            "execution (first delivery → last task done)": last_done - first,
            "first task started after first delivery": first_run - first,
            "sink tail (last task done → last row in PG)": synced["last"] - last_done,
            "poll detection (last row in PG → seen)": done - synced["last"],
        },
        "ingest_rate": n / max(1e-9, last_in - first),
    }
    if samples is not None:
        out["profile"] = samples
    return out


# ---------------------------------------------------------------- the run


async def guarded(errors: dict[str, str], key: str, coro: Any) -> Any:
    """Run one measurement; a failure is recorded under `key` and does not stop the others."""
    load = os.getloadavg()[0]
    try:
        result = await coro
        if isinstance(result, dict):
            result["loadavg_1m_at_start"] = load
        return result
    except Exception as exc:
        errors[key] = f"{type(exc).__name__}: {exc}"[-4000:]
        print(f"  ! {key}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr, flush=True)
        return None


def say(text: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


WARM_IMPORTS = ("ecoworker.cli, ecoworker.worker, ecoworker.ops, handlers.base, handlers.ai, handlers.storage, "
                "bench.raw_consumer, bench.celery_seed, celery.bin.celery, celery.apps.worker, "
                "celery.worker.consumer, celery.concurrency.prefork, celery.concurrency.thread, "
                "celery.concurrency.solo")


async def warm_up(args: argparse.Namespace, ctx: common.Ctx, res: dict[str, Any]) -> None:
    """Fill the bytecode cache and the servers' caches; nothing here is counted."""
    say("warm-up: bytecode cache, and one small run of each system (not counted)")
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", f"import {WARM_IMPORTS}"],
                            env=ctx.child_env(), cwd=common.REPO, check=False, capture_output=True)
    errors: dict[str, str] = {}
    if "raw" in args.only:
        await guarded(errors, "warm-up raw", raw_consumer.measure(ctx, 200))
    if {"ecoworker", "latency", "scale"} & set(args.only):
        await guarded(errors, "warm-up ecoworker", measure_ecoworker(ctx, 200))
    if "celery" in args.only:
        await guarded(errors, "warm-up celery", celery_seed.measure(ctx, 200, "prefork", 2))
    res["warm_up_errors"] = errors


async def run(args: argparse.Namespace, ctx: common.Ctx) -> dict[str, Any]:
    res: dict[str, Any] = {"raw": [], "ecoworker": [], "celery": [], "celery_modes": [], "scale": {},
                           "errors": {}}
    await warm_up(args, ctx, res)
    if "celery" in args.only:
        await select_celery_mode(args, ctx, res)
    await run_rounds(args, ctx, res)
    if "latency" in args.only:
        say(f"latency: 100 tasks/s for {args.latency_seconds:g} s")
        res["latency"] = await guarded(res["errors"], "latency", latency.measure(ctx, 100.0, args.latency_seconds))
    if "scale" in args.only:
        for i in range(args.scale_repeats):  # interleaved, as the rounds above: drift hits every N alike
            for n in args.scale_ns:
                say(f"scale: ecoworker, {n} tasks ({i + 1}/{args.scale_repeats})")
                r = await guarded(res["errors"], f"scale {n} #{i + 1}", measure_ecoworker(ctx, n))
                res["scale"].setdefault(str(n), []).append(r)
    if args.profile:
        say(f"profile: ecoworker under py-spy, {args.n} tasks")
        res["profile_run"] = await guarded(res["errors"], "profile", measure_ecoworker(ctx, args.n, args.py_spy))
    for name in EXTRAS:
        if name in args.only:
            res[name] = run_extra(ctx, name)
    return res


async def select_celery_mode(args: argparse.Namespace, ctx: common.Ctx, res: dict[str, Any]) -> None:
    """Which pool suits Celery best on this machine: one run of each, at a quarter of N."""
    select_n = args.n if args.quick else max(1000, args.n // 4)
    for pool, c in CELERY_MODES:
        say(f"celery mode selection: {pool} -c {c}, {select_n} tasks")
        r = await guarded(res["errors"], f"celery {pool}", celery_seed.measure(ctx, select_n, pool, c))
        if r:
            res["celery_modes"].append(r)


async def run_rounds(args: argparse.Namespace, ctx: common.Ctx, res: dict[str, Any]) -> None:
    """raw, ecoworker, Celery (best pool), round after round: load bursts hit all three alike."""
    best = max(res["celery_modes"], key=lambda r: r["rate_warm"], default=None)
    for i in range(args.repeats):
        tag = f"round {i + 1}/{args.repeats}"
        if "raw" in args.only:
            say(f"{tag}: raw ceiling, {args.n} messages")
            res["raw"].append(await guarded(res["errors"], f"raw #{i + 1}", raw_consumer.measure(ctx, args.n)))
        if "ecoworker" in args.only:
            say(f"{tag}: ecoworker end to end, {args.n} tasks")
            res["ecoworker"].append(await guarded(res["errors"], f"ecoworker #{i + 1}",
                                                  measure_ecoworker(ctx, args.n)))
        if best is not None:
            say(f"{tag}: celery {best['pool']} -c {best['concurrency']}, {args.n} tasks")
            res["celery"].append(await guarded(res["errors"], f"celery #{i + 1}", celery_seed.measure(
                ctx, args.n, best["pool"], best["concurrency"])))


def run_extra(ctx: common.Ctx, name: str) -> dict[str, Any]:
    """bench/bench_<name>.py belongs to another engineer: run it as is, keep its output."""
    if not (common.REPO / "bench" / f"bench_{name}.py").exists():
        return {"skipped": f"bench/bench_{name}.py is not there"}
    say(f"extra: python -m bench.bench_{name}")
    try:
        out = subprocess.run([sys.executable, "-m", f"bench.bench_{name}"], env=ctx.child_env(),
                             cwd=common.REPO, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 600 s"}
    return {"exit_code": out.returncode, "stdout": out.stdout[-6000:], "stderr": out.stderr[-2000:]}


# ---------------------------------------------------------------- summary and table

TARGETS = {"eco_vs_raw": 0.8, "eco_vs_celery": 4.0, "p99_ms": 10.0, "rss_mb": 80.0, "flatness": 0.85}


def _med(runs: list[dict[str, Any] | None], key: str) -> float | None:
    return common.median([r[key] for r in runs if r and r.get(key) is not None])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Medians per measurement, ratios of medians (and per round), and the issue's targets."""
    s: dict[str, Any] = {}
    for name in ("raw", "ecoworker", "celery"):
        runs = [r for r in res[name] if r]
        if runs:
            s[name] = {"runs": len(runs), "rate": _med(runs, "rate"), "rate_warm": _med(runs, "rate_warm"),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
            if name == "celery":
                s[name]["peak_pss_mb"] = max(r["peak_pss_mb"] for r in runs)
            if name == "ecoworker":
                s[name]["rss_at_first_delivery_mb"] = _med(runs, "rss_at_first_delivery_mb")
                s[name]["worker_peak_rss_mb"] = max(r.get("worker_peak_rss_mb", 0) for r in runs)
                s[name]["peak_pss_mb"] = max(r.get("peak_pss_mb", 0) for r in runs)
                s[name]["children"] = sorted({c for r in runs for c in r.get("children", ())})
                s[name]["ingest_rate"] = _med(runs, "ingest_rate")
                s[name]["cpu_ms_per_1000"] = _med(runs, "cpu_ms_per_1000")
    if "celery" in s:
        first = next(r for r in res["celery"] if r)
        s["celery"]["mode"] = f"{first['pool']} -c {first['concurrency']}"
    eco_runs = [r for r in res["ecoworker"] if r]
    if eco_runs:
        s["ecoworker"]["phases_seconds"] = {k: common.median([r["phases_seconds"][k] for r in eco_runs])
                                            for k in eco_runs[0]["phases_seconds"]}
    eco, raw, cel = (s.get(k, {}) for k in ("ecoworker", "raw", "celery"))
    s["ratios"] = {
        "eco_vs_raw": _ratio(eco.get("rate"), raw.get("rate")),
        "eco_vs_raw_warm": _ratio(eco.get("rate_warm"), raw.get("rate_warm")),
        "eco_vs_celery": _ratio(eco.get("rate"), cel.get("rate")),
        "eco_vs_celery_warm": _ratio(eco.get("rate_warm"), cel.get("rate_warm")),
        "per_round_eco_vs_raw": [_ratio(e["rate"], r["rate"]) for e, r in zip(res["ecoworker"], res["raw"],
                                                                               strict=False) if e and r],
        "per_round_eco_vs_celery": [_ratio(e["rate"], c["rate"]) for e, c in zip(res["ecoworker"], res["celery"],
                                                                                 strict=False) if e and c],
    }
    scale = {n: {"rate": _med(runs, "rate"), "rate_warm": _med(runs, "rate_warm"),
                 "peak_rss_mb": max((r["peak_rss_mb"] for r in runs if r), default=None)}
             for n, runs in res["scale"].items()}
    if len(scale) >= 2:
        small, large = scale[min(scale, key=int)], scale[max(scale, key=int)]
        s["flatness"] = _ratio(large["rate"], small["rate"])
        s["flatness_warm"] = _ratio(large["rate_warm"], small["rate_warm"])
    s["scale"] = scale
    return s


def _fmt(value: float | None, spec: str = ",.0f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def _check(value: float | None, target: float, higher: bool = True) -> str:
    if value is None:
        return ""
    return "ok" if (value >= target if higher else value <= target) else "MISS"


def _verdict(value: float | None, warm: float | None, target: float) -> str:
    if value is None:
        return ""
    return f"{_check(value, target)} (steady: {_check(warm, target)})"


ROW = "{:<50} {:>12} {:>18}   {:<12} {}".format
RULE = "-" * 100


def _header(doc: dict[str, Any]) -> list[str]:
    m, code = doc["machine"], doc["code"]
    changed = code["changed_during_run"]
    return [f"ecoworker benchmark — {doc['started']}  ({doc['seconds']:.0f} s)",
            f"machine: {m['cores']} cores ({m['cpu']}), {m['memory_gb']} GB, Linux {m['kernel']}; "
            f"load {m['loadavg_at_start'][0]:.1f} → {m['loadavg_at_end'][0]:.1f} (shared machine: figures are noisy)",
            f"Python {m['python']}, uvloop {m['uvloop']}, aio-pika {m['aio_pika']}, Celery {m['celery']}; "
            f"RabbitMQ {m['rabbitmq']}, PostgreSQL {m['postgresql']}, SQLite {m['sqlite']}",
            f"journal on {m['journal_filesystem']}; 4 KiB write + fdatasync p50/p99: overwrite "
            f"{m['fdatasync_overwrite_p50_ms']:.2f}/{m['fdatasync_overwrite_p99_ms']:.2f} ms, append "
            f"{m['fdatasync_append_p50_ms']:.2f}/{m['fdatasync_append_p99_ms']:.2f} ms",
            f"code: {code['commit']} + {len(code['uncommitted'])} uncommitted file(s) in ecoworker/ and handlers/ "
            f"(digest {code['digest']})"
            + (f"; WARNING: changed during the run: {', '.join(changed)}" if changed else "")]


def _throughput(doc: dict[str, Any]) -> list[str]:
    s, res, cfg = doc["summary"], doc["results"], doc["settings"]
    eco, raw, cel, ratios = s.get("ecoworker", {}), s.get("raw", {}), s.get("celery", {}), s["ratios"]
    if not (eco or raw or cel):
        return []
    lines = ["", f"Throughput, N = {cfg['n']:,}, median of {cfg['repeats']} interleaved round(s). "
             "'from start' = process spawn → done; 'steady' = first delivery → done.",
             ROW("", "from start", "steady", "target", ""), RULE,
             ROW("raw ceiling: bare aio-pika, ack each (msgs/s)", _fmt(raw.get("rate")), _fmt(raw.get("rate_warm")),
                 "", ""),
             ROW("ecoworker: until all rows in PostgreSQL (/s)", _fmt(eco.get("rate")), _fmt(eco.get("rate_warm")),
                 "", ""),
             ROW("  ecoworker ingest only: journal + ack (/s)", "", _fmt(eco.get("ingest_rate")), "", ""),
             ROW("  ecoworker CPU per 1,000 tasks (ms, its process tree)", _fmt(eco.get("cpu_ms_per_1000")),
                 "", "", ""),
             ROW(f"Celery seed, best pool ({cel.get('mode', '—')}) (/s)", _fmt(cel.get("rate")),
                 _fmt(cel.get("rate_warm")), "", "")]
    for key, label in (("eco_vs_raw", "ecoworker ÷ raw ceiling"), ("eco_vs_celery", "ecoworker ÷ best Celery")):
        value, warm = ratios[key], ratios[f"{key}_warm"]
        lines.append(ROW(label, _fmt(value, ".2f", "x"), _fmt(warm, ".2f", "x"), f"≥ {TARGETS[key]:g}x",
                         _verdict(value, warm, TARGETS[key])))
    for key, label in (("per_round_eco_vs_raw", "  ÷ raw, round by round (from start)"),
                       ("per_round_eco_vs_celery", "  ÷ Celery, round by round (from start)")):
        lines.append(ROW(label, "", ", ".join(_fmt(v, ".2f") for v in ratios[key]) or "—", "", ""))
    for r in res["celery_modes"]:
        lines.append(ROW(f"  Celery pool selection: {r['pool']} -c {r['concurrency']}, N = {r['n']:,}",
                         _fmt(r["rate"]), _fmt(r["rate_warm"]), "", ""))
    lines += ["", ROW("Memory (peak RSS, MB)", "", "", "target", ""), RULE,
              ROW("ecoworker process tree (each VmHWM, summed)", _fmt(eco.get("peak_rss_mb"), ".1f"), "",
                  f"≤ {TARGETS['rss_mb']:g} MB", _check(eco.get("peak_rss_mb"), TARGETS["rss_mb"], False)),
              ROW("  of which the worker process alone", _fmt(eco.get("worker_peak_rss_mb"), ".1f"), "", "",
                  "children: " + (", ".join(eco.get("children", ())) or "none")),
              ROW("  ecoworker process tree, summed PSS (shared pages once)", _fmt(eco.get("peak_pss_mb"), ".1f"),
                  "", "", ""),
              ROW("  ecoworker tree at its first delivery (after imports)",
                  _fmt(eco.get("rss_at_first_delivery_mb"), ".1f"), "", "", ""),
              ROW("Celery seed, process tree: summed RSS / summed PSS", _fmt(cel.get("peak_rss_mb"), ".1f"),
                  _fmt(cel.get("peak_pss_mb"), ".1f"), "", "PSS: shared pages once"),
              ROW("raw consumer", _fmt(raw.get("peak_rss_mb"), ".1f"), "", "", "")]
    return lines


def _latency(lat: dict[str, Any] | None) -> list[str]:
    if not lat:
        return []
    p99 = lat["delivery_to_ack_p99_ms"]
    lines = ["", ROW(f"Latency at {lat['achieved_rate']:.0f} tasks/s for {lat['seconds']:g} s (ms)", "p50", "p99",
                     "target", ""), RULE,
             ROW("delivery → ack (worker histogram)", _fmt(lat["delivery_to_ack_p50_ms"], ".2f"), _fmt(p99, ".2f"),
                 f"p99 ≤ {TARGETS['p99_ms']:g}", _check(p99, TARGETS["p99_ms"], False)),
             ROW("  of which: group commit (fsync, histogram)", _fmt(lat["ingest_commit_p50_ms"], ".2f"),
                 _fmt(lat["ingest_commit_p99_ms"], ".2f"), "", "")]
    for key, label in (("publish_to_confirm", "publish → broker confirm (client)"),
                       ("publish_to_ingest", "publish → journal batch start (client)"),
                       ("publish_to_done", "publish → handler done (client)"),
                       ("publish_to_postgres", "publish → row in PostgreSQL (client)")):
        lines.append(ROW(label, _fmt(lat[f"{key}_p50_ms"], ".2f"), _fmt(lat[f"{key}_p99_ms"], ".2f"), "", ""))
    return lines


def _scale(s: dict[str, Any]) -> list[str]:
    if not s["scale"]:
        return []
    lines = ["", ROW("Scale: ecoworker tasks/s by N", "from start", "steady", "target", "peak RSS"), RULE]
    for n, v in sorted(s["scale"].items(), key=lambda kv: int(kv[0])):
        lines.append(ROW(f"N = {int(n):,}", _fmt(v["rate"]), _fmt(v["rate_warm"]), "",
                         _fmt(v["peak_rss_mb"], ".1f", " MB")))
    flat, warm = s.get("flatness"), s.get("flatness_warm")
    lines.append(ROW("largest N ÷ smallest N", _fmt(flat, ".2f"), _fmt(warm, ".2f"), f"≥ {TARGETS['flatness']:g}",
                     _verdict(flat, warm, TARGETS["flatness"])))
    return lines


def _where(doc: dict[str, Any]) -> list[str]:
    lines = []
    phases = doc["summary"].get("ecoworker", {}).get("phases_seconds")
    if phases:
        lines += ["", f"Where an ecoworker run's time goes (N = {doc['settings']['n']:,}, median seconds)", RULE]
        lines += [f"  {k:<52} {v:8.2f}" for k, v in phases.items()]
    prof = (doc["results"].get("profile_run") or {}).get("profile")
    if prof:
        share = 100 * prof["import_samples"] / max(1, prof["samples"])
        lines += ["", f"py-spy, ecoworker worker, {prof['samples']} on-CPU samples at 250 Hz ({prof['raw']})", RULE,
                  "  threads: " + ", ".join(f"{t['function']} {t['percent']}%" for t in prof["threads"]),
                  f"  start-up imports: {share:.0f}% of samples. Top self time outside imports "
                  f"({prof['samples'] - prof['import_samples']} samples; 'Runner.run' = uvloop's C code):"]
        lines += [f"  {t['percent']:5.1f}%  {t['function']}" for t in prof["self_outside_imports"]]
        lines.append("  ecoworker functions, inclusive (outside imports; a coroutine counts only while it runs):")
        lines += [f"  {t['percent']:5.1f}%  {t['function']}" for t in prof["ecoworker_inclusive_outside_imports"]]
    return lines


def render(doc: dict[str, Any]) -> str:
    lines = [*_header(doc), *_throughput(doc), *_latency(doc["results"].get("latency")), *_scale(doc["summary"]),
             *_where(doc)]
    lines += [f"ERROR {key}: {text.splitlines()[0][:200]}" for key, text in doc["results"]["errors"].items()]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    ctx = common.Ctx(common.stack_env(), common.TMP_ROOT / f"{stamp}-{uuid.uuid4().hex[:6]}")
    ctx.tmp.mkdir(parents=True, exist_ok=True)
    machine = await common.machine_info(ctx)
    code = common.code_state()
    try:
        await common.create_bench_db(ctx)
        results = await run(args, ctx)
    finally:
        await common.delete_queues(ctx.amqp_url, ctx.queues, ctx.exchanges)
        await common.drop_bench_db(ctx)
        if not args.keep_tmp:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    machine["loadavg_at_end"] = os.getloadavg()
    now = common.code_state()["files"]
    code["changed_during_run"] = sorted(f for f in {*now, *code["files"]} if now.get(f) != code["files"].get(f))
    doc = {
        "started": started.isoformat(), "seconds": (datetime.now(UTC) - started).total_seconds(),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "settings": {"n": args.n, "repeats": args.repeats, "scale_ns": args.scale_ns, "only": args.only,
                     "latency_seconds": args.latency_seconds, "quick": args.quick, "full": args.full},
        "machine": machine, "code": code, "summary": summarize(results), "results": results,
    }
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / f"bench-{stamp}.json"
    text = json.dumps(doc, indent=2, default=str)
    path.write_text(text)
    (common.RESULTS / "latest.json").write_text(text)
    print(render(doc))
    print(f"\nwritten: {path.relative_to(common.REPO)} (and bench/results/latest.json)")
    return 1 if results["errors"] else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop

        code = uvloop.run(main_async(args))
    except ImportError:  # pragma: no cover
        code = asyncio.run(main_async(args))
    sys.exit(code)


if __name__ == "__main__":
    main()
