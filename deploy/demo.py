"""The demo: two real ecoworker processes on the local stack, a realistic sample, a summary.

    python -m deploy.demo            # (`make demo` installs deps and starts the stack first)
    python -m deploy.demo --short    # a smaller sample, still every task type (CI)
    python -m deploy.demo --down     # stop the demo's workers and the OpenAI stand-in

It reads the stack's env file ($ECOWORKER_STACK_DIR/env, /tmp/ecoworker-stack/env),
migrates PostgreSQL, creates the bucket, starts the OpenAI stand-in (unless
OPENAI_API_KEY or OPENAI_BASE_URL is set), starts `ecoworker --queue storage`
and `ecoworker --queue ai`, publishes the sample with publisher confirms, waits
for every result to reach PostgreSQL `task_results` and prints them. The workers
keep running afterwards (pids in /tmp/ecoworker-demo/pids). Exit status 0 only
when every sample task is SUCCESS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = Path(os.environ.get("ECOWORKER_DEMO_DIR") or "/tmp/ecoworker-demo")
PIDS = DEMO_DIR / "pids"
LAST_RUN = DEMO_DIR / "last-run.json"
LOGS = DEMO_DIR / "logs"
UPLOADS = DEMO_DIR / "uploads"
BUCKET = "ecoeco-uploads"
QUEUES = {"storage": 9101, "ai": 9102}  # queue → preferred metrics port
STANDIN_MARKER = "deploy.dev.openai_standin"
TASK_ORDER = ("upload_to_s3", "process_image", "classify_waste_image", "chat_with_llm", "extract_text_from_image")
TTY = sys.stdout.isatty()


def say(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


def bold(text: str) -> str:
    return f"\x1b[1m{text}\x1b[0m" if TTY else text


def step(number: int, title: str, text: str) -> None:
    say(f"[{number}/7] {bold(f'{title:<11}')} {text}")


class DemoError(Exception):
    """Something the person running the demo must fix; the message says what."""


# --------------------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, Z …), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z")


def _is_ours(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return str(DEMO_DIR) in cmdline or STANDIN_MARKER in cmdline


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _proc_state(int(entry.name)) not in (None, "Z"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.append(int(entry.name))
    return members


def read_pids() -> list[tuple[str, int]]:
    if not PIDS.exists():
        return []
    return [(name, int(pid)) for name, pid in (line.split() for line in PIDS.read_text().splitlines() if line.strip())]


def stop_processes(timeout: float = 20.0) -> list[str]:
    """SIGTERM the demo's processes (from the pid file), SIGKILL what is left; returns what was stopped."""
    ours = [(name, pid) for name, pid in read_pids() if alive(pid) and _is_ours(pid)]
    for _, pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # workers: stop consuming, finish in-flight tasks, flush, exit 0
    deadline = time.monotonic() + timeout
    while any(alive(pid) for _, pid in ours) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _, pid in ours:
        # Each was started as a session leader: its group holds its pool processes too.
        for member in [pid, *_group_members(pid)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(member, signal.SIGKILL)
    PIDS.unlink(missing_ok=True)
    return [f"{name} (pid {pid})" for name, pid in ours]


def start_process(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start `cmd` in its own session (it outlives the demo), logging to LOGS/name.log."""
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    with PIDS.open("a") as f:
        f.write(f"{name} {proc.pid}\n")
    return proc


def free_port(preferred: int = 0) -> int:
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DemoError("no free TCP port on 127.0.0.1")


def log_tail(name: str, lines: int = 15) -> str:
    path = LOGS / f"{name}.log"
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
    return f"--- last lines of {path} ---\n" + "\n".join(text)


async def wait_http(url: str, proc: subprocess.Popen[bytes], name: str, within: float = 60.0) -> None:
    """Poll `url` until it answers 200; fail early, with the log, if the process exits."""
    import aiohttp

    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DemoError(f"{name} exited with status {proc.returncode}\n{log_tail(name)}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise DemoError(f"{name} not ready after {within:.0f} s ({url})\n{log_tail(name)}")


# --------------------------------------------------------------------------- the stack


def stack_env() -> dict[str, str]:
    """The KEY=value lines services.sh wrote; starts the stack when there is no env file yet."""
    path = Path(os.environ.get("ECOWORKER_STACK_DIR") or "/tmp/ecoworker-stack") / "env"
    if not path.exists():
        if os.geteuid() != 0:
            raise DemoError(f"no stack env file at {path}: start the stack first with `make services-up` (as root)")
        say(f"no stack env file at {path}: starting the local stack (deploy/dev/services.sh up)")
        if subprocess.run(["bash", str(REPO / "deploy/dev/services.sh"), "up"], check=False).returncode != 0:
            raise DemoError("deploy/dev/services.sh up failed (its messages are above)")
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def migrate(env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "ecoworker.cli", "db", "migrate"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise DemoError(f"`ecoworker db migrate` failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout.strip()


def s3_client(env: dict[str, str]) -> Any:
    import aioboto3

    session = aioboto3.Session(aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                               aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                               region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"))
    return session.client("s3", endpoint_url=env.get("S3_ENDPOINT_URL"))


async def ensure_bucket(s3: Any) -> None:
    try:
        await s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass


# --------------------------------------------------------------------------- workers


def worker_env(stack: dict[str, str], openai_url: str | None) -> dict[str, str]:
    env = {**os.environ, **stack}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update({
        "ECOWORKER_UPLOAD_ROOT": str(UPLOADS),
        "ECOWORKER_S3_BUCKET": BUCKET,
        "ECOWORKER_OCR_ENGINE": "tesseract" if shutil.which("tesseract") else "openai",
        "ECOWORKER_METRICS_HOST": "127.0.0.1",
        "ECOWORKER_SYNC_MAX_DELAY": "0.5",
    })
    if openai_url:
        env["OPENAI_BASE_URL"] = openai_url
    return env


def worker_command(queue: str, port: int) -> list[str]:
    script = Path(sys.executable).with_name("ecoworker")
    prefix = [sys.executable, str(script)] if script.exists() else [sys.executable, "-m", "ecoworker.cli"]
    return [*prefix, "--queue", queue, "--wal", str(DEMO_DIR / f"{queue}.db"), "--metrics-port", str(port),
            "--worker-name", f"demo-{queue}", "--grace-period", "10", "--log-format", "text"]


# --------------------------------------------------------------------------- the sample


@dataclass
class SampleTask:
    queue: str
    label: str  # the summary's "input" column
    message: Any  # ecoworker.envelope.TaskMessage


def _font(size: int, heavy: bool = False) -> Any:
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if heavy else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu"):
        with contextlib.suppress(OSError):
            return ImageFont.truetype(f"{folder}/{name}", size)
    return ImageFont.load_default(size)  # Pillow's own scalable font (no fonts-dejavu-core)


def _encode(image: Any, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """`image` as bytes; with `orientation`, stored turned as a phone stores it, with camera EXIF and GPS."""
    from PIL import ExifTags, Image

    exif = Image.Exif()
    if orientation is not None:
        if orientation == 6:  # the pixels lie on their side; EXIF says "turn 90 degrees clockwise"
            image = image.transpose(Image.Transpose.ROTATE_90)
        gps = ExifTags.GPS
        exif[ExifTags.Base.Make] = "EcoCam"
        exif[ExifTags.Base.Model] = "Field Unit 3"
        exif[ExifTags.Base.DateTime] = "2025:11:26 09:14:00"
        exif[ExifTags.Base.Orientation] = orientation
        exif[ExifTags.IFD.GPSInfo] = {gps.GPSLatitudeRef: "N", gps.GPSLatitude: (52.0, 31.0, 12.5),
                                      gps.GPSLongitudeRef: "E", gps.GPSLongitude: (13.0, 24.0, 36.0)}
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 88, "exif": exif} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def draw_photo(seed: int) -> Any:
    """A 1600x1200 street scene: sky, a row of sorting bins, litter."""
    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    w, h = 1600, 1200
    image = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(image)
    horizon = h * 3 // 5
    for y in range(horizon):
        t = y / horizon
        d.line([(0, y), (w, y)], fill=(int(70 + 110 * t), int(130 + 90 * t), int(220 + 25 * t)))
    d.rectangle([0, horizon, w, h], fill=(96, 128, 72))
    sun = rnd.randint(200, w - 300)
    d.ellipse([sun, 80, sun + 160, 240], fill=(255, 222, 120))
    for i, colour in enumerate([(37, 99, 235), (234, 179, 8), (22, 163, 74), (120, 113, 108)]):
        x, top = 170 + i * 340 + rnd.randint(-25, 25), horizon - 260
        d.rectangle([x, top, x + 230, horizon + 120], fill=colour, outline=(30, 30, 30), width=4)
        d.rectangle([x - 12, top - 36, x + 242, top], fill=tuple(max(0, c - 50) for c in colour))
        for wheel in (x + 20, x + 166):
            d.ellipse([wheel, horizon + 100, wheel + 44, horizon + 144], fill=(20, 20, 20))
    for _ in range(60):
        x, y = rnd.randint(0, w - 30), rnd.randint(horizon + 160, h - 20)
        d.rectangle([x, y, x + rnd.randint(8, 30), y + rnd.randint(5, 18)],
                    fill=(rnd.randint(60, 255), rnd.randint(60, 255), rnd.randint(60, 255)))
    return image


def draw_item(kind: str) -> Any:
    """A 640x480 picture of one waste item on a table."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (236, 232, 224))
    d = ImageDraw.Draw(image)
    d.rectangle([0, 390, 640, 480], fill=(176, 148, 112))
    if kind == "green-bottle":
        d.rounded_rectangle([265, 160, 375, 400], 18, fill=(28, 110, 58))
        d.polygon([(265, 170), (300, 100), (340, 100), (375, 170)], fill=(28, 110, 58))
        d.rectangle([300, 60, 340, 104], fill=(28, 110, 58))
        d.rectangle([296, 50, 344, 66], fill=(200, 170, 40))
        d.rectangle([265, 250, 375, 320], fill=(244, 240, 226))
    elif kind == "soda-can":
        d.rounded_rectangle([255, 180, 385, 400], 14, fill=(196, 198, 204))
        d.rectangle([255, 240, 385, 340], fill=(200, 30, 40))
        d.ellipse([255, 168, 385, 196], fill=(170, 172, 178))
    elif kind == "banana-peel":
        d.chord([170, 170, 470, 450], 200, 340, fill=(240, 205, 40))
        d.pieslice([260, 300, 330, 420], 180, 360, fill=(225, 190, 30))
        d.pieslice([330, 300, 400, 420], 180, 360, fill=(215, 180, 25))
        d.rectangle([312, 250, 328, 300], fill=(110, 80, 30))
    elif kind == "newspaper":
        d.polygon([(150, 140), (500, 120), (520, 390), (170, 400)], fill=(248, 248, 242))
        for row in range(12):
            y = 160 + row * 19
            d.line([(180, y + 2), (480, y - 6)], fill=(120, 120, 120), width=5 if row else 12)
    else:  # aa-battery
        d.rounded_rectangle([150, 250, 470, 340], 20, fill=(30, 30, 34))
        d.rectangle([330, 250, 470, 340], fill=(212, 150, 40))
        d.rectangle([470, 280, 490, 310], fill=(190, 190, 190))
        d.text((420, 272), "+", fill=(30, 30, 34), font=_font(40, heavy=True))
    return image


SIGN = ("RECYCLING CENTRE", "Glass: green container", "Paper: blue container", "Batteries: ask the staff")


def draw_sign() -> Any:
    """A sign with four lines of text in DejaVu Sans (52 and 40 px), for OCR."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1100, 420), "white")
    d = ImageDraw.Draw(image)
    for number, line in enumerate(SIGN):
        d.text((50, 36 + number * 92), line, fill=(20, 20, 20), font=_font(52 if number == 0 else 40, number == 0))
    return image


def write_upload_files(root: Path, short: bool) -> list[tuple[str, dict[str, Any]]]:
    """Files under the upload root; returns (path relative to the root, extra upload arguments)."""
    rnd = random.Random(7)
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "telemetry").mkdir(exist_ok=True)
    bins = ("paper", "plastic", "glass", "organic", "residual")
    rows = ["date,district,route,bin_type,weight_kg"] + [
        f"2025-11-{1 + i % 28:02d},D{1 + i % 9},R{100 + i % 37},{bins[i % 5]},{rnd.uniform(5, 480):.1f}"
        for i in range(2500)
    ]
    (root / "reports/collections.csv").write_text("\n".join(rows) + "\n")
    big = 9 if short else 12
    (root / "telemetry/truck-07.bin").write_bytes(os.urandom(big * 1024 * 1024))  # > 8 MiB: multipart
    files: list[tuple[str, dict[str, Any]]] = [("reports/collections.csv", {}), ("telemetry/truck-07.bin", {})]
    if not short:
        totals = {b: round(sum(float(r.rsplit(",", 1)[1]) for r in rows[1:] if f",{b}," in r), 1) for b in bins}
        (root / "reports/summary.json").write_text(json.dumps({"month": "2025-11", "kg": totals}, indent=2))
        (root / "reports/routes.txt").write_text("Route R101: Mon/Thu 06:00, 412 stops\n" * 40)
        files += [("reports/summary.json", {}), ("reports/routes.txt", {"delete_after": True})]
    return files


CHAT: tuple[tuple[str, str, dict[str, Any]], ...] = (  # (label, prompt, more arguments)
    ("pizza box", "Where do I put an empty pizza box with a bit of grease on it?", {}),
    ("old AA batteries", "How should I dispose of old AA batteries?", {}),
    ("glass jar lid", "Do I need to remove the lid from a glass jar before recycling it?",
     {"system": "You are a friendly municipal waste-sorting assistant. Answer in two sentences.", "max_tokens": 120}),
    ("coffee grounds", "Can coffee grounds go in the compost?", {}),
)


async def prepare_sample(s3: Any, run_id: str, short: bool) -> list[SampleTask]:
    """Write the sample's files, put its images in S3, and build its task messages (fresh ids)."""
    from ecoworker.client import build_message

    shutil.rmtree(UPLOADS, ignore_errors=True)  # earlier runs' files
    root = UPLOADS / run_id
    prefix = f"demo/{run_id}"
    tasks: list[SampleTask] = []

    def add(queue: str, label: str, task: str, **kwargs: Any) -> None:
        tasks.append(SampleTask(queue, label, build_message(task, (), kwargs)))

    objects: dict[str, bytes] = {}
    for rel, extra in write_upload_files(root, short):
        label = Path(rel).name + (" (deleted)" if extra.get("delete_after") else "")
        add("storage", label, "upload_to_s3", file_path=f"{run_id}/{rel}", s3_key=f"{prefix}/{rel}", **extra)
    custom = [{"name": "square", "width": 400, "height": 400, "mode": "fit", "format": "webp"},
              {"name": "large", "width": 1600, "format": "jpeg", "quality": 85}]
    for number, (orientation, variants) in enumerate([(6, None), (1, custom), (1, None)][: 1 if short else 3], 1):
        key = f"{prefix}/photos/street-{number}.jpg"
        objects[key] = _encode(draw_photo(number), orientation=orientation)
        add("storage", Path(key).name, "process_image", source_key=key, **({"variants": variants} if variants else {}))
    for kind in ("green-bottle", "soda-can", "banana-peel", "newspaper", "aa-battery")[: 1 if short else 5]:
        key = f"{prefix}/items/{kind}.jpg"
        objects[key] = _encode(draw_item(kind))
        add("ai", f"{kind}.jpg", "classify_waste_image", source_key=key)
    for label, prompt, extra in CHAT[: 1 if short else 4]:
        add("ai", label, "chat_with_llm", prompt=prompt, **extra)
    sign = draw_sign()
    (root / "signs").mkdir(parents=True, exist_ok=True)
    (root / "signs/recycling-centre.png").write_bytes(_encode(sign, "PNG"))
    add("ai", "sign.png (file)", "extract_text_from_image", file_path=f"{run_id}/signs/recycling-centre.png")
    if not short:
        key = f"{prefix}/signs/recycling-centre-phone.jpg"
        objects[key] = _encode(sign, orientation=6)
        add("ai", "sign.jpg (sideways)", "extract_text_from_image", source_key=key)
        add("ai", "sign.jpg (vision)", "extract_text_from_image", source_key=key, engine="openai")
    await asyncio.gather(*(s3.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType="image/jpeg")
                           for key, body in objects.items()))
    return tasks


# --------------------------------------------------------------------------- results

RESULTS_SQL = """
SELECT task_id, task_name, status, attempts, worker_name, result::text AS result, error,
       extract(epoch FROM completed_at - started_at)::float8 AS run_seconds
FROM task_results WHERE task_id = ANY($1::text[])
"""
SHORT_NAMES = {"upload_to_s3": "upload", "process_image": "image", "classify_waste_image": "classify",
               "chat_with_llm": "chat", "extract_text_from_image": "ocr"}


async def wait_for_results(conn: Any, sample: list[SampleTask], within: float,
                           procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Poll task_results until every sample task is there, showing progress; give up on timeout."""
    ids = [t.message.id for t in sample]
    wanted = Counter(t.message.task for t in sample)
    start = time.monotonic()
    shown = ""
    while True:
        rows = await conn.fetch(RESULTS_SQL, ids)
        done = Counter(r["task_name"] for r in rows)
        failed = sum(r["status"] != "SUCCESS" for r in rows)
        counts = ", ".join(f"{SHORT_NAMES[n]} {done[n]}/{wanted[n]}" for n in TASK_ORDER)
        line = f"{len(rows)}/{len(ids)} in PostgreSQL ({counts})" + (f", {failed} not SUCCESS" if failed else "")
        elapsed = f" {time.monotonic() - start:.1f} s"
        if TTY:
            say(f"\r\x1b[K[7/7] {bold('running    ')} {line}{elapsed}", end="")
        elif line != shown:
            step(7, "running", line + elapsed)
        shown = line
        if len(rows) == len(ids):
            break
        exited = [q for q, p in procs.items() if p.poll() is not None]
        if exited or time.monotonic() - start > within:
            say()
            say(f"worker {', '.join(exited)} exited" if exited else f"gave up waiting after {within:.0f} s")
            break
        await asyncio.sleep(0.25)
    if TTY:
        say()
    return {r["task_id"]: r for r in rows}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def describe(task: str, r: dict[str, Any]) -> str:
    """One line saying what a task's result holds."""
    if task == "upload_to_s3":
        parts = r["etag"].rsplit("-", 1)[1] if "-" in r["etag"] else None
        where = "s3://.../" + r["s3_key"].split("/", 2)[-1]  # the key without demo/<run>/
        return f"{where}, {_size(r['size'])}" + (f", multipart upload in {parts} parts" if parts else "")
    if task == "process_image":
        src = r["source"]
        made = ", ".join(f"{v['name']} {v['width']}x{v['height']} {v['format']}" for v in r["variants"])
        return f"{src['width']}x{src['height']} {src['format']} -> {made}"
    if task == "classify_waste_image":
        return f"{r['category']} ({r['confidence']:.2f}): {r['disposal_instructions']}"
    if task == "chat_with_llm":
        return f"{r['usage']['total_tokens']} tokens: \"{r['text']}\""
    if task == "extract_text_from_image":
        text = " / ".join(line.strip() for line in r["text"].splitlines() if line.strip())
        conf = f" {r['confidence']:.0f}%" if r.get("confidence") is not None else ""
        return f"{r['engine']}{conf}: \"{text}\""
    return json.dumps(r)


def print_summary(sample: list[SampleTask], rows: dict[str, Any]) -> bool:
    """The table of results read back from PostgreSQL; True when every task is SUCCESS."""
    width = max(100, shutil.get_terminal_size().columns) if TTY else 160
    say()
    say(bold("Results, read back from PostgreSQL task_results:"))
    say(f"  {'task':<24} {'input':<20} {'status':<8} {'run time':>8}  result")
    bad = []
    for t in sample:
        r = rows.get(t.message.id)
        if r is None:
            status, took, text = "MISSING", "", "not in PostgreSQL (still running, or lost)"
        else:
            status, took = r["status"], f"{r['run_seconds']:.2f} s" if r["run_seconds"] is not None else ""
            try:
                text = describe(t.message.task, json.loads(r["result"])) if status == "SUCCESS" else r["error"] or ""
            except (KeyError, TypeError, ValueError, AttributeError):
                text = (r["result"] or "")[:200]
        if status != "SUCCESS":
            bad.append((t, status, r))
        line = f"  {t.message.task:<24} {t.label[:20]:<20} {status:<8} {took:>8}  {text}"
        say(line if len(line) <= width else line[: width - 3] + "...")
    for t, status, r in bad:
        say(f"\n{status}: {t.message.task} {t.message.id} ({t.label})")
        if r is not None:
            say(f"  attempts {r['attempts']} on {r['worker_name']}: {r['error']}")
    return not bad


# --------------------------------------------------------------------------- run


@dataclass
class Demo:
    """What one run started, for the footer and last-run.json."""

    run_id: str
    short: bool
    stack: dict[str, str]
    openai_url: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sample: list[SampleTask] = field(default_factory=list)
    workers_started: float = 0.0

    def save(self, ok: bool | None) -> None:
        """Write last-run.json: the published task ids (tests and people look them up)."""
        LAST_RUN.write_text(json.dumps({
            "run_id": self.run_id,
            "short": self.short,
            "ok": ok,
            "tasks": [{"id": t.message.id, "task": t.message.task, "queue": t.queue, "label": t.label}
                      for t in self.sample],
            "metrics": {q: f"http://127.0.0.1:{p}/metrics" for q, p in self.ports.items()},
            "pids": {q: p.pid for q, p in self.procs.items()},
        }, indent=2) + "\n")


def begin(short: bool) -> Demo:
    """Stop a previous demo, reset its run files, read the stack, migrate PostgreSQL (steps 1-2)."""
    from ecoworker.settings import redact_url

    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    say(bold(f"ecoworker demo ({'short' if short else 'full'} sample), run {run_id}"))
    stopped = stop_processes()
    if stopped:
        say(f"        stopped the previous demo's {', '.join(stopped)}")
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    LAST_RUN.unlink(missing_ok=True)
    stack = stack_env()
    step(1, "stack", f"RabbitMQ {redact_url(stack['RABBITMQ_URL'])}, PostgreSQL, S3 {stack['S3_ENDPOINT_URL']}")
    step(2, "PostgreSQL", f"ecoworker db migrate: {migrate({**os.environ, **stack, 'PYTHONPATH': str(REPO)})}")
    return Demo(run_id, short, stack)


async def start_openai(demo: Demo) -> None:
    """Step 3: the real API when configured, else the stand-in in its own process."""
    if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
        shown = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        step(3, "OpenAI", f"using {shown} (OPENAI_API_KEY / OPENAI_BASE_URL are set)")
        return
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    standin = start_process("openai-standin", [sys.executable, "-m", STANDIN_MARKER, "--port", str(port)], env)
    await wait_http(f"http://127.0.0.1:{port}/healthz", standin, "openai-standin")
    demo.openai_url = f"http://127.0.0.1:{port}/v1"
    step(3, "OpenAI", f"stand-in on {demo.openai_url} (deterministic answers; set OPENAI_API_KEY for the real API)")


def start_workers(demo: Demo) -> None:
    """Step 4: `ecoworker --queue storage` and `ecoworker --queue ai`, each with its journal and port."""
    env = worker_env(demo.stack, demo.openai_url)
    demo.ports = {queue: free_port(preferred) for queue, preferred in QUEUES.items()}
    demo.workers_started = time.monotonic()
    demo.procs = {q: start_process(q, worker_command(q, demo.ports[q]), env) for q in QUEUES}
    started = " and ".join(f"{q} (pid {demo.procs[q].pid}, :{demo.ports[q]})" for q in QUEUES)
    step(4, "workers", f"starting {started}; logs in {LOGS}")


async def wait_ready(demo: Demo) -> float:
    """Wait for both workers' /readyz (consuming, journal writable); returns seconds since their start."""
    urls = {q: f"http://127.0.0.1:{demo.ports[q]}/readyz" for q in QUEUES}
    await asyncio.gather(*(wait_http(urls[q], demo.procs[q], q) for q in QUEUES))
    return time.monotonic() - demo.workers_started


async def publish(demo: Demo, waited: float) -> None:
    """Step 6: publish the sample with ecoworker.client.Client (every publish confirmed)."""
    from ecoworker.client import Client

    async with Client.connect(demo.stack["RABBITMQ_URL"]) as client:
        for queue in QUEUES:
            await client.enqueue_many([t.message for t in demo.sample if t.queue == queue], queue)
    counts = Counter(t.message.task for t in demo.sample)
    step(6, "published", f"workers ready after {waited:.1f} s; {len(demo.sample)} tasks published with confirms:")
    say(" " * 18 + ", ".join(f"{counts[name]} {name}" for name in TASK_ORDER))


async def run(short: bool) -> int:
    t0 = time.monotonic()
    demo = begin(short)
    await start_openai(demo)
    start_workers(demo)  # they boot while the sample is made
    async with s3_client(demo.stack) as s3:
        await ensure_bucket(s3)
        demo.sample = await prepare_sample(s3, demo.run_id, short)
    step(5, "sample", f"files under {UPLOADS}, images in s3://{BUCKET}/demo/{demo.run_id}/")
    await publish(demo, await wait_ready(demo))
    demo.save(None)

    import asyncpg

    conn = await asyncpg.connect(demo.stack["POSTGRES_DSN"])
    try:
        rows = await wait_for_results(conn, demo.sample, 60.0 if short else 120.0, demo.procs)
    finally:
        await conn.close()
    ok = print_summary(demo.sample, rows)
    demo.save(ok)
    print_footer(demo, ok, time.monotonic() - t0)
    if not ok:
        for queue in QUEUES:
            say(log_tail(queue, 25))
    return 0 if ok else 1


def print_footer(demo: Demo, ok: bool, elapsed: float) -> None:
    from ecoworker.settings import redact_url

    verdict = "All sample tasks succeeded" if ok else "Some sample tasks did not succeed"
    say()
    say(bold(f"{verdict} ({len(demo.sample)} tasks, {elapsed:.1f} s in all)."))
    stack_dir = demo.stack.get("ECOWORKER_STACK_DIR", "/tmp/ecoworker-stack")
    openai = demo.openai_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    for label, text in (
        ("metrics", "  ".join(f"http://127.0.0.1:{p}/metrics ({q})" for q, p in demo.ports.items())),
        ("probes", f"/healthz /readyz /stats on the same ports, e.g. http://127.0.0.1:{demo.ports['ai']}/stats"),
        ("PostgreSQL", f"{redact_url(demo.stack['POSTGRES_DSN'])}  (table task_results)"),
        ("RabbitMQ", f"{redact_url(demo.stack['RABBITMQ_URL'])}  (queues storage, ai; dead letters: <queue>.dead)"),
        ("S3", f"{demo.stack['S3_ENDPOINT_URL']}  s3://{BUCKET}/demo/{demo.run_id}/"),
        ("OpenAI", openai + ("  (stand-in: answers are placeholders, not real vision)" if demo.openai_url else "")),
        ("journals", "  ".join(str(DEMO_DIR / f"{q}.db") for q in QUEUES)),
        ("logs", str(LOGS / "{storage,ai,openai-standin}.log")),
        ("task ids", str(LAST_RUN)),
    ):
        say(f"  {label:<11} {text}")
    say()
    say("Try it:")
    say(f"  set -a; . {stack_dir}/env; set +a")
    say(f"  .venv/bin/ecoworker wal stats --db {DEMO_DIR / 'ai.db'}")
    if shutil.which("psql"):
        say('  psql "$POSTGRES_DSN" -c "SELECT task_name, status, completed_at - started_at AS took '
            'FROM task_results ORDER BY completed_at DESC LIMIT 10"')
    prompt = json.dumps({"prompt": "Where do old paint cans go?"})
    say(f"  .venv/bin/ecoworker publish chat_with_llm --queue ai --kwargs '{prompt}'")
    say(f"The workers keep running (pids in {PIDS}). Stop them with `python -m deploy.demo --down`;")
    say("`make demo-down` also stops the stack.")


def down() -> int:
    stopped = stop_processes()
    say(f"stopped {', '.join(stopped)}" if stopped else "no demo processes were running")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="a smaller sample (every task type), for CI")
    parser.add_argument("--down", action="store_true", help="stop the demo's workers and the OpenAI stand-in")
    args = parser.parse_args(argv)
    if args.down:
        sys.exit(down())
    try:
        code = asyncio.run(run(args.short))
    except DemoError as exc:
        say(f"\ndemo failed: {exc}")
        if PIDS.exists():
            say(f"what it started keeps running (pids in {PIDS}); `python -m deploy.demo --down` stops it")
        code = 1
    except KeyboardInterrupt:
        say(f"\ninterrupted; what was started keeps running: `python -m deploy.demo --down` stops it ({PIDS})")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
