"""The raw ceiling: a bare aio-pika consumer (uvloop) that only acks each message.

Nothing a Python consumer does on this machine can drain a queue faster, so
ecoworker's throughput is reported as a fraction of this. Run as its own
process (`python -m bench.raw_consumer --queue Q --n N`) so it has its own
interpreter and loop; it prints one JSON line with its timings.

`measure()` is the parent's side: publish N persistent messages (the same
native envelopes ecoworker gets), start the consumer, read its line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import aio_pika

from bench import common


async def consume(url: str, queue: str, n: int, prefetch: int, within: float) -> dict[str, Any]:
    started = time.time()
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=prefetch)
        q = await channel.declare_queue(queue, durable=True, passive=True)
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        seen = {"count": 0, "first": 0.0}

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not seen["first"]:
                seen["first"] = time.time()
            await message.ack()
            seen["count"] += 1
            if seen["count"] == n and not done.done():
                done.set_result(time.time())

        connected = time.time()
        await q.consume(on_message)
        last_ack = await asyncio.wait_for(done, within)
    finally:
        await conn.close()
    return {"started": started, "connected": connected, "first_delivery": seen["first"],
            "last_ack": last_ack, "acked": seen["count"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("RABBITMQ_URL"))
    p.add_argument("--queue", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--prefetch", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(consume(args.url, args.queue, args.n, args.prefetch, args.timeout))
    result["peak_rss_kb"] = common.proc_status_kb(os.getpid(), "VmHWM")
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- the parent's side


async def measure(ctx: common.Ctx, n: int, prefetch: int = 1000) -> dict[str, Any]:
    """Publish `n` messages, drain them with the bare consumer, return msgs/s."""

    queue = ctx.queue("raw")
    conn = await aio_pika.connect(ctx.amqp_url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        publish_s = await common.prepublish_noops(channel, queue, n)
        out_path = ctx.tmp / f"{queue}.out"
        cmd = [sys.executable, "-m", "bench.raw_consumer", "--queue", queue, "--n", str(n),
               "--prefetch", str(prefetch), "--timeout", str(max(60, n / 100))]
        proc = common.Proc(cmd, ctx.child_env(RABBITMQ_URL=ctx.amqp_url), out_path)
        code = await asyncio.to_thread(proc.popen.wait)
        if code != 0:
            raise RuntimeError(f"raw consumer exited {code}:\n{proc.tail()}")
        r = json.loads((await asyncio.to_thread(out_path.read_text)).strip().splitlines()[-1])
        left = await common.queue_depth(channel, queue)
    finally:
        await conn.close()
    cold = r["last_ack"] - proc.started
    warm = r["last_ack"] - r["first_delivery"]
    return {"n": n, "prefetch": prefetch, "publish_rate": n / publish_s, "left_in_queue": left,
            "seconds_from_spawn": cold, "seconds_from_first_delivery": warm,
            "rate": n / cold, "rate_warm": n / warm, "startup_seconds": r["first_delivery"] - proc.started,
            "peak_rss_mb": r["peak_rss_kb"] / 1024}


if __name__ == "__main__":
    main()
