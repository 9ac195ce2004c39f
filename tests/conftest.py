"""Shared fixtures: the private local service stack (RabbitMQ, PostgreSQL, S3/moto).

The stack is started by ``deploy/dev/services.sh up`` (idempotent: a no-op taking
~0.2 s when it is already running) and described by the env file it writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICES_SH = REPO_ROOT / "deploy" / "dev" / "services.sh"
DEFAULT_STACK_DIR = "/tmp/ecoworker-stack"

# First start on a fresh machine may apt-install packages and build moto's venv.
STACK_UP_TIMEOUT_S = 900


def parse_env_file(path: Path) -> dict[str, str]:
    """Parse the ``KEY=value`` lines written by ``services.sh up``."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def run_services(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = STACK_UP_TIMEOUT_S,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``services.sh ARGS``; on failure with ``check`` fail the test with its output."""
    proc = subprocess.run(
        ["bash", str(SERVICES_SH), *args],
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"services.sh {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def stack_dir(env: Mapping[str, str] | None = None) -> Path:
    """The state dir services.sh uses for the given (or current) environment."""
    source = os.environ if env is None else env
    return Path(source.get("ECOWORKER_STACK_DIR") or DEFAULT_STACK_DIR)


@pytest.fixture(scope="session")
def services() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``services("cmd", ..., env=None, timeout=..., check=True)`` runs deploy/dev/services.sh."""
    return run_services


@pytest.fixture(scope="session")
def stack_env() -> Iterator[dict[str, str]]:
    """Bring the local stack up (idempotent) and return its env file as a dict.

    The values are also exported into ``os.environ`` for the whole session
    (RABBITMQ_URL, POSTGRES_DSN, S3_ENDPOINT_URL, AWS_*, ECOWORKER_*), and the
    previous values are restored afterwards. The stack itself is left running.
    """
    if os.geteuid() != 0 or shutil.which("apt-get") is None or shutil.which("runuser") is None:
        pytest.skip("the local service stack needs root on a Debian machine")
    state = stack_dir()
    run_services("up")
    values = parse_env_file(state / "env")
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield values
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@pytest.fixture
async def amqp(stack_env: dict[str, str]) -> Any:
    """A confirmed-publishing aio-pika connection to the stack's RabbitMQ; deletes the test's queues after."""
    from tests.workers import Amqp

    conn = await aio_pika.connect(stack_env["RABBITMQ_URL"])
    channel = await conn.channel(publisher_confirms=True)
    client = Amqp(conn, channel)
    client.created = []  # type: ignore[attr-defined]
    yield client
    await client.delete(*client.created)  # type: ignore[attr-defined]
    await conn.close()


@pytest.fixture
def queue_name(amqp: Any) -> str:
    """A unique queue name for one test; it and its `.dead` queue are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    amqp.created += [name, f"{name}.dead"]
    return name


@pytest.fixture
def workers(stack_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory: `workers(queue, **env)` → a started WorkerProcess; all are killed after the test."""
    from tests.workers import WorkerProcess, env_for_worker

    started: list[WorkerProcess] = []

    def make(*queues: str, args: tuple[str, ...] = (), name: str | None = None, **env: str) -> WorkerProcess:
        label = name or f"w{len(started)}"
        w = WorkerProcess(tmp_path / f"{label}.db", queues, env_for_worker(stack_env, **env),
                          tmp_path / f"{label}.log", args)
        started.append(w)
        return w.start()

    yield make
    for w in started:
        w.kill()


# ------------------------------------------------------------------ a private stack
PORT_KEYS = (
    "ECOWORKER_AMQP_PORT",
    "ECOWORKER_RABBIT_DIST_PORT",
    "ECOWORKER_EPMD_PORT",
    "ECOWORKER_PG_PORT",
    "ECOWORKER_S3_PORT",
)



def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this machine (IPv4 and IPv6)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports



# Below the kernel's ephemeral range (32768-60999): a client socket elsewhere in the suite
# can never be holding one of these when the private RabbitMQ binds it.
PRIVATE_BASE = (27672, 27673, 27369, 27432, 27900)


def free_port_set(skip: int = 0) -> dict[str, int]:
    """Ports for a second stack, none of them in use (RabbitMQ's CLI uses dist+1..+10)."""
    used = listening_ports()
    candidates = []
    for offset in range(100, 1000, 100):
        ports = {key: port + offset for key, port in zip(PORT_KEYS, PRIVATE_BASE, strict=True)}
        dist = ports["ECOWORKER_RABBIT_DIST_PORT"]
        if not (set(ports.values()) | set(range(dist + 1, dist + 11))) & used:
            candidates.append(ports)
    if len(candidates) <= skip:
        raise AssertionError("no free port set for a second stack")
    return candidates[skip]


@pytest.fixture(scope="module")
def private_stack(stack_env: dict[str, str]) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """A second, independent stack in its own state dir on other ports, for tests that stop,
    restart or cut its services without disturbing the shared one.

    Yields (environment for services.sh, parsed env file); purged afterwards.
    """
    import tempfile

    state = Path(tempfile.mkdtemp(prefix="ecoworker-stack2-", dir="/tmp"))
    state.chmod(0o755)  # postgres/rabbitmq users must reach it
    env = dict(os.environ)
    env["ECOWORKER_STACK_DIR"] = str(state)
    try:
        for attempt in range(3):  # a port taken meanwhile: tidy up and try the next free set
            env.update({k: str(v) for k, v in free_port_set(skip=attempt).items()})
            if run_services("up", env=env, check=attempt == 2).returncode == 0:
                break
            run_services("down", env=env, timeout=180, check=False)
        yield env, parse_env_file(state / "env")
    finally:
        run_services("down", "--purge", env=env, timeout=180, check=False)
        shutil.rmtree(state, ignore_errors=True)
