"""Delivery-to-ack latency of a running ecoworker at a steady publish rate.

The worker's own view comes from its `ecoworker_delivery_to_ack_seconds`
histogram: scraped before and after the steady phase, quantiles from the
bucket deltas by linear interpolation (what Prometheus' `histogram_quantile`
does). The client's view comes from publish timestamps against the journal's
`created_at` (the consumer started the batch holding the delivery) and
`completed_at` (handler done), and PostgreSQL's `synced_at` (result shipped).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika

from bench import common

HISTOGRAM = "ecoworker_delivery_to_ack_seconds"
COMMIT = "ecoworker_ingest_commit_seconds"  # the group commit (fsync) inside it
BATCH = "ecoworker_ingest_batch_size"


async def measure(ctx: common.Ctx, rate: float = 100.0, seconds: float = 10.0) -> dict[str, Any]:
    """Publish `rate` tasks/s for `seconds` to a ready worker; return worker- and client-side quantiles."""
    import asyncpg

    from ecoworker.client import amqp_message, build_message

    queue = ctx.queue("latency")
    wal, port = ctx.tmp / f"{queue}.db", common.free_port()
    pg = await asyncpg.connect(ctx.pg_dsn)
    await pg.execute("TRUNCATE task_results")
    proc = common.start_ecoworker(ctx, queue, wal, port, ctx.tmp / f"{queue}.log")
    conn = None
    try:
        conn = await aio_pika.connect(ctx.amqp_url)
        await common.wait_ready(proc, port)
        channel = await conn.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        # warm-up: the first deliveries pay for lazy imports and the PostgreSQL pool
        await common.publish_all(channel, (amqp_message(build_message("ecoworker.noop", (), {"warm": i}))
                                           for i in range(50)), queue)
        await asyncio.sleep(1.0)
        text = (await asyncio.to_thread(common.http_get, port, "/metrics"))[1]
        before = {h: common.histogram_buckets(text, h) for h in (HISTOGRAM, COMMIT, BATCH)}
        published: dict[str, float] = {}
        confirm: list[float] = []

        async def publish_one(msg: Any) -> None:
            sent = time.time()
            published[msg.id] = sent
            await exchange.publish(amqp_message(msg), routing_key=queue)
            confirm.append(time.time() - sent)

        count = int(rate * seconds)
        start = time.monotonic()
        tasks = []
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(publish_one(build_message("ecoworker.noop", (), {"i": i}))))
        await asyncio.gather(*tasks)
        achieved = count / (time.monotonic() - start)
        ids = list(published)
        deadline = time.monotonic() + 60
        while await pg.fetchval("SELECT count(*) FROM task_results WHERE task_id = ANY($1)", ids) < count:
            if time.monotonic() > deadline or not proc.alive:
                raise RuntimeError("latency run: results did not all reach PostgreSQL:\n" + proc.tail())
            await asyncio.sleep(common.POLL)
        text = (await asyncio.to_thread(common.http_get, port, "/metrics"))[1]
        after = {h: common.histogram_buckets(text, h) for h in (HISTOGRAM, COMMIT, BATCH)}
        synced = dict(await pg.fetch("SELECT task_id, extract(epoch FROM synced_at)::float8 FROM task_results "
                                     "WHERE task_id = ANY($1)", ids))
    finally:
        if conn is not None:
            await conn.close()
        await pg.close()
        proc.stop()
    rows = common.journal_query(wal, "SELECT task_id, created_at, completed_at FROM task_wal")
    received = [r[1] - published[r[0]] for r in rows if r[0] in published]
    finished = [r[2] - published[r[0]] for r in rows if r[0] in published and r[2]]
    in_pg = [synced[t] - published[t] for t in ids if t in synced]
    ms = 1000.0

    def q(values: list[float], p: float) -> float | None:
        v = common.percentile(values, p)
        return None if v is None else v * ms

    def hq(p: float, name: str = HISTOGRAM, scale: float = ms) -> float | None:
        v = common.histogram_quantile(p, before[name], after[name])
        return None if v is None else v * scale

    acks = after[HISTOGRAM]
    observed = (acks[-1][1] - dict(before[HISTOGRAM]).get(float("inf"), 0.0)) if acks else 0
    return {
        "rate": rate, "seconds": seconds, "published": count, "achieved_rate": achieved,
        "observations": observed,
        "delivery_to_ack_p50_ms": hq(0.50), "delivery_to_ack_p99_ms": hq(0.99),
        "ingest_commit_p50_ms": hq(0.50, COMMIT), "ingest_commit_p99_ms": hq(0.99, COMMIT),
        "ingest_batch_p50": hq(0.50, BATCH, 1.0), "ingest_batch_p99": hq(0.99, BATCH, 1.0),
        "publish_to_confirm_p50_ms": q(confirm, 0.50), "publish_to_confirm_p99_ms": q(confirm, 0.99),
        "publish_to_ingest_p50_ms": q(received, 0.50), "publish_to_ingest_p99_ms": q(received, 0.99),
        "publish_to_done_p50_ms": q(finished, 0.50), "publish_to_done_p99_ms": q(finished, 0.99),
        "publish_to_postgres_p50_ms": q(in_pg, 0.50), "publish_to_postgres_p99_ms": q(in_pg, 0.99),
        "histogram_buckets_ms": [le * ms for le, _ in acks if le != float("inf")],
    }
