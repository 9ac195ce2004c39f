"""Proves the private local stack of deploy/dev/services.sh (RabbitMQ, PostgreSQL, S3)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import aio_pika
import aioboto3
import asyncpg
import pytest

from tests.conftest import PORT_KEYS, listening_ports

Services = Callable[..., subprocess.CompletedProcess[str]]

# The first use of the stack on a fresh machine may install packages (fixture setup
# counts toward pytest-timeout's per-test budget).
pytestmark = pytest.mark.timeout(900)

ENV_KEYS = {
    "RABBITMQ_URL",
    "POSTGRES_DSN",
    "S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "ECOWORKER_RABBIT_NODE",
    "ECOWORKER_RABBITMQCTL",
    "ECOWORKER_PG_CTL",
    "ECOWORKER_STACK_DIR",
}
DEFAULT_PORTS = {"56720", "56721", "43690", "54320", "59000"}
# ------------------------------------------------------------------ helpers
def read_env_file(path: Path) -> dict[str, str]:
    """Parse the KEY=value lines of a services.sh env file."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (orphans may linger as zombies here)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("State:"):
            return line.split()[1] != "Z"
    return False


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def stack_pids(services: Services, env: dict[str, str]) -> dict[str, int]:
    """``services.sh pids``: the live processes of the stack selected by ``env``."""
    out = services("pids", env=env, timeout=60).stdout
    return {name: int(pid) for name, pid in (line.split() for line in out.splitlines() if line)}


def port_accepts(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def amqp_round_trip(url: str) -> tuple[bytes, bytes]:
    """Declare a temporary queue, publish one message to it and get it back: (sent, got)."""
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()  # publisher confirms: publish returns once routed
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        body = f"hello {uuid.uuid4()}".encode()
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
        message = await queue.get(timeout=10)
        assert message is not None
        await message.ack()
        return body, message.body


async def probe_all(env: dict[str, str]) -> None:
    """Check that AMQP, PostgreSQL and S3 of the stack described by ``env`` answer."""
    sent, got = await amqp_round_trip(env["RABBITMQ_URL"])
    assert got == sent
    conn = await asyncpg.connect(env["POSTGRES_DSN"], timeout=10)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    session = aioboto3.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    async with session.client("s3", endpoint_url=env["S3_ENDPOINT_URL"]) as s3:
        assert "Buckets" in await s3.list_buckets()


# ------------------------------------------------------------------ default stack
def test_env_file_has_all_keys_and_sources_in_bash(stack_env: dict[str, str]) -> None:
    """The env file has every documented key and bash `source` yields the same values."""
    assert set(stack_env) >= ENV_KEYS
    env_file = Path(stack_env["ECOWORKER_STACK_DIR"]) / "env"
    script = f'set -a; . "{env_file}"; set +a; env -0'
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, check=True, env={}
    ).stdout.decode()
    sourced = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    for key in ENV_KEYS:
        assert sourced[key] == stack_env[key]
        assert os.environ[key] == stack_env[key]
    for key in ("ECOWORKER_RABBITMQCTL", "ECOWORKER_PG_CTL"):
        assert os.access(stack_env[key], os.X_OK)


async def test_amqp_publish_and_get_on_temp_queue(stack_env: dict[str, str]) -> None:
    """aio_pika connects, declares a temporary queue, publishes and gets the message back."""
    sent, got = await amqp_round_trip(stack_env["RABBITMQ_URL"])
    assert got == sent


async def test_postgres_select_1(stack_env: dict[str, str]) -> None:
    """asyncpg connects to POSTGRES_DSN (database ecoworker) and `SELECT 1` returns 1."""
    conn = await asyncpg.connect(stack_env["POSTGRES_DSN"], timeout=10)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "ecoworker"
    finally:
        await conn.close()


async def test_s3_bucket_put_get_round_trip(stack_env: dict[str, str]) -> None:
    """aioboto3 creates a bucket on S3_ENDPOINT_URL, puts an object and reads it back."""
    bucket = f"ecoworker-test-{uuid.uuid4().hex[:12]}"
    payload = os.urandom(64 * 1024)
    session = aioboto3.Session()  # credentials and region come from the exported env
    async with session.client("s3", endpoint_url=stack_env["S3_ENDPOINT_URL"]) as s3:
        await s3.create_bucket(Bucket=bucket)
        try:
            await s3.put_object(Bucket=bucket, Key="dir/blob.bin", Body=payload)
            response = await s3.get_object(Bucket=bucket, Key="dir/blob.bin")
            async with response["Body"] as stream:
                assert await stream.read() == payload
        finally:
            await s3.delete_object(Bucket=bucket, Key="dir/blob.bin")
            await s3.delete_bucket(Bucket=bucket)


def test_up_is_idempotent_and_status_reports_running(
    stack_env: dict[str, str], services: Services
) -> None:
    """A second `up` keeps the same processes, and `status` exits 0 listing all three."""
    before = stack_pids(services, dict(os.environ))
    out = services("up", timeout=120).stdout
    assert out.count("already running") == 3
    assert stack_pids(services, dict(os.environ)) == before
    status = services("status", timeout=60).stdout
    assert status.count("running") == 3


# ------------------------------------------------------------------ second stack
@pytest.fixture(scope="module")
def second_stack(private_stack: tuple[dict[str, str], dict[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """A second, independent stack in its own state dir on other ports (see conftest.private_stack)."""
    return private_stack


@pytest.mark.slow
def test_second_stack_answers_on_its_own_ports(
    stack_env: dict[str, str],
    services: Services,
    second_stack: tuple[dict[str, str], dict[str, str]],
) -> None:
    """A second stack's AMQP, PostgreSQL and S3 answer on its own ports and processes."""
    env, values = second_stack
    for key in ("RABBITMQ_URL", "POSTGRES_DSN", "S3_ENDPOINT_URL"):
        assert values[key] != stack_env[key]
        assert not any(f":{port}" in values[key] for port in DEFAULT_PORTS)
    asyncio.run(probe_all(values))
    mine, default = stack_pids(services, env), stack_pids(services, dict(os.environ))
    assert {"rabbitmq", "epmd", "postgres", "moto"} <= set(mine)
    assert not set(mine.values()) & set(default.values())


@pytest.mark.slow
def test_second_stack_control_commands(
    services: Services, second_stack: tuple[dict[str, str], dict[str, str]]
) -> None:
    """restart-rabbit keeps durable messages; the pg_ctl wrapper and stop-pg/start-pg work."""
    env, values = second_stack
    queue = f"durable-{uuid.uuid4().hex[:8]}"

    async def publish_durable() -> bytes:
        connection = await aio_pika.connect(values["RABBITMQ_URL"], timeout=10)
        async with connection:
            channel = await connection.channel()
            q = await channel.declare_queue(queue, durable=True)
            body = b"survives restart"
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=q.name,
            )
            return body

    async def get_durable() -> bytes:
        connection = await aio_pika.connect(values["RABBITMQ_URL"], timeout=10)
        async with connection:
            channel = await connection.channel()
            q = await channel.declare_queue(queue, durable=True)
            message = await q.get(timeout=10)
            assert message is not None
            await message.ack()
            await q.delete(if_unused=False, if_empty=False)
            return message.body

    async def select_1() -> int:
        conn = await asyncpg.connect(values["POSTGRES_DSN"], timeout=10)
        try:
            return int(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()

    sent = asyncio.run(publish_durable())
    old_beam = stack_pids(services, env)["rabbitmq"]
    services("restart-rabbit", env=env, timeout=180)
    assert stack_pids(services, env)["rabbitmq"] != old_beam
    assert asyncio.run(get_durable()) == sent

    ctl = subprocess.run(
        [values["ECOWORKER_RABBITMQCTL"], "-q", "list_queues", "name"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert queue not in ctl.stdout

    pg_port = int(env["ECOWORKER_PG_PORT"])
    subprocess.run(
        [values["ECOWORKER_PG_CTL"], "stop", "-m", "immediate"],
        capture_output=True, timeout=60, check=True,
    )
    assert not port_accepts(pg_port)
    services("start-pg", env=env, timeout=120)
    assert asyncio.run(select_1()) == 1
    services("stop-pg", env=env, timeout=120)
    assert not port_accepts(pg_port)
    subprocess.run(
        [values["ECOWORKER_PG_CTL"], "start"], capture_output=True, timeout=60, check=True
    )
    assert asyncio.run(select_1()) == 1


@pytest.mark.slow
def test_second_stack_down_leaves_no_process(
    stack_env: dict[str, str],
    services: Services,
    second_stack: tuple[dict[str, str], dict[str, str]],
) -> None:
    """`down` of the second stack ends all its processes and ports; the default stack stays."""
    env, _values = second_stack
    state = env["ECOWORKER_STACK_DIR"]
    dist = int(env["ECOWORKER_RABBIT_DIST_PORT"])
    ports = {int(env[key]) for key in PORT_KEYS} | set(range(dist, dist + 11))
    recorded = stack_pids(services, env)
    default_before = stack_pids(services, dict(os.environ))
    assert {"rabbitmq", "epmd", "postgres", "moto"} <= set(recorded)
    assert pids_mentioning(state)

    out = services("down", env=env, timeout=180).stdout
    assert "stack down" in out

    assert [name for name, pid in recorded.items() if pid_alive(pid)] == []
    assert not ports & listening_ports()
    assert pids_mentioning(state) == []
    assert stack_pids(services, env) == {}
    assert not Path(state, "env").exists()
    # the default stack was not touched
    assert stack_pids(services, dict(os.environ)) == default_before
    assert services("status", timeout=60).returncode == 0
