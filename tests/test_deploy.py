"""deploy/: the Compose file, Kubernetes manifests and systemd units agree with the code.

Every ``QCELERY_*`` variable is a settings field (and the values build valid settings),
every command is a ``qcelery`` subcommand the CLI parses, worker pools, queues, KEDA
triggers and ports line up, beat runs once and Flower never runs without auth.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from qcelery import status as st
from qcelery.registry import check_name
from qcelery.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"

#: the subcommands of ``qcelery`` (mirrors qcelery.cli; checked against the real typer
#: app below when it can be imported)
CLI_SUBCOMMANDS = frozenset(
    {
        "adopt",
        "qlib-data",
        "up",
        "down",
        "enqueue",
        "status",
        "wait",
        "recover",
        "reset-waiting",
        "retry-failed",
        "prioritize",
        "remove",
        "pools",
        "collect",
        "worker",
        "beat",
        "flower",
        "demo",
    }
)
#: options of the long-running subcommands the deploy files may use (mirrors qcelery.cli)
CLI_OPTIONS = {
    "worker": {"--pool": True, "--concurrency": True, "--autoscale": True, "--loglevel": True},
    "beat": {},
    "flower": {"--port": True, "--no-auth": False, "--address": True},
}
#: variables the deploy files may set beside the QCELERY_* settings
OTHER_VARIABLES = frozenset({"MLFLOW_TRACKING_URI", "FLOWER_BASIC_AUTH"})
#: helpers that are not qcelery settings (read by other tools, not by qcelery)
NON_SETTING_VARIABLES: frozenset[str] = frozenset()

QCELERY_SERVICES = ("worker-cpu", "worker-gpu", "beat", "flower")


# ------------------------------------------------------------------------ loading
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def k8s(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d.get("kind") == kind}


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?message}`` / ``${VAR}`` with nothing set."""

    def sub(m: re.Match) -> str:
        op, arg = m.group(2), m.group(3) or ""
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return "user:secret"  # required: the check is that it is required (see test below)
        return ""

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", sub, str(value))


def pod_env(deployment: dict) -> dict[str, str]:
    """The environment of a Deployment's container: ConfigMap envFrom, then env (secrets as the template)."""
    configmaps = k8s("ConfigMap")
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], f"{item['name']} comes from an unknown secret {ref['name']}"
            env[item["name"]] = secret["stringData"][ref["key"]]
    return env


def compose_env(service: str) -> dict[str, str]:
    return {k: interpolate(v) for k, v in compose()["services"][service]["environment"].items()}


def setting_fields() -> set[str]:
    return set(Settings.model_fields)


def settings_from_env(env: dict[str, str], monkeypatch, tmp_path) -> Settings:
    """Build Settings the way a deployed process does: from these variables only."""
    import os

    for key in list(os.environ):
        if key.startswith("QCELERY_") or key == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no ./qcelery.toml
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def command_of(argv: list[str]) -> tuple[str, list[str]]:
    """(subcommand, arguments) of a ``qcelery ...`` command line."""
    assert argv and Path(argv[0]).name == "qcelery", f"command {argv} does not start with qcelery"
    assert len(argv) > 1 and argv[1] in CLI_SUBCOMMANDS, f"{argv}: unknown subcommand"
    return argv[1], argv[2:]


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def check_arguments(sub: str, args: list[str]) -> None:
    """Options are in the contract, and the real CLI parses them when it is importable."""
    allowed = CLI_OPTIONS.get(sub, {})
    i = 0
    while i < len(args):
        assert args[i] in allowed, f"qcelery {sub}: option {args[i]!r} not in the contract {sorted(allowed)}"
        i += 2 if allowed[args[i]] else 1
    real = real_cli()
    if real is not None:
        real.commands[sub].make_context(sub, [a.replace("%i", "cpu") for a in args])  # raises on a bad option


def real_cli():
    try:
        import typer.main

        from qcelery.cli.main import app
    except ImportError:
        return None
    return typer.main.get_command(app)


def all_commands() -> list[tuple[str, list[str]]]:
    """Every qcelery command line in deploy/ (where it is found, argv)."""
    found = [(f"compose {name}", svc["command"]) for name, svc in compose()["services"].items() if name in QCELERY_SERVICES]
    for name, dep in k8s("Deployment").items():
        found.append((f"k8s {name}", dep["spec"]["template"]["spec"]["containers"][0]["command"]))
    for path in SYSTEMD.glob("*.service"):
        found.append((f"systemd {path.name}", shlex.split(unit(path)["Service"]["ExecStart"])))
    return found


def lease_seconds(env: dict[str, str]) -> float:
    return float(env.get("QCELERY_LEASE_SECONDS", Settings.model_fields["lease_seconds"].default))


def seconds(value) -> float:
    """A Compose duration ("120s", "2m") or a systemd time span ("120", "2min", "1min 30s")."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(value)):
        total += float(number) * units[suffix]
    return total


# ------------------------------------------------------------------------ the CLI contract
def test_the_cli_contract_matches_the_real_command_line():
    cli = real_cli()
    if cli is None:  # the CLI module is written in parallel; the constant stands until it lands
        return
    assert set(cli.commands) == CLI_SUBCOMMANDS
    for sub, options in CLI_OPTIONS.items():
        declared = {opt for p in cli.commands[sub].params for opt in p.opts}
        assert set(options) <= declared, f"qcelery {sub} lacks {set(options) - declared}"


@pytest.mark.parametrize("where, argv", all_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_is_a_qcelery_subcommand_the_cli_parses(where, argv):
    sub, args = command_of(argv)
    assert sub in ("worker", "beat", "flower"), f"{where}: a deployment runs only long-lived processes, not {sub}"
    check_arguments(sub, args)


# ------------------------------------------------------------------------ settings
def deploy_variables() -> list[tuple[str, str]]:
    """(where, NAME) of every variable a deploy file sets for qcelery."""
    found = []
    for name, svc in compose()["services"].items():
        if name in QCELERY_SERVICES:
            found += [(f"compose {name}", key) for key in svc["environment"]]
    for cm in k8s("ConfigMap").values():
        found += [(f"k8s ConfigMap {cm['metadata']['name']}", key) for key in cm["data"]]
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    found += [("k8s Secret", key) for key in secret["stringData"]]
    found += [("systemd qcelery.env.example", key) for key in env_file(SYSTEMD / "qcelery.env.example")]
    text = "\n".join(p.read_text() for p in [COMPOSE, *K8S.glob("*.yaml"), *SYSTEMD.iterdir()])
    found += [("mentioned", key) for key in set(re.findall(r"\bQCELERY_[A-Z_]+\b", text))]
    return found


def test_every_qcelery_variable_is_a_settings_field():
    fields = setting_fields()
    for where, key in deploy_variables():
        if key.startswith("QCELERY_"):
            assert key[len("QCELERY_") :].lower() in fields, f"{where}: {key} is not a field of Settings"
        else:
            assert key in OTHER_VARIABLES | NON_SETTING_VARIABLES, f"{where}: unexpected variable {key}"


def test_compose_services_build_valid_settings_pointing_at_the_compose_servers(monkeypatch, tmp_path):
    services = compose()["services"]
    for name in QCELERY_SERVICES:
        env = compose_env(name)
        s = settings_from_env(env, monkeypatch, tmp_path)
        assert s.mongo_url == "mongodb://mongo:27017"
        assert s.broker_url == "redis://redis:6379/0" and s.result_backend == "redis://redis:6379/1"
        assert s.mlflow_tracking_uri == "http://mlflow:5000"
        assert s.mongo_db
        for url in (s.mongo_url, s.broker_url, s.result_backend, s.mlflow_tracking_uri):
            host = urlsplit(url).hostname
            assert host in services, f"compose {name}: {url} names no service"
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--port=5000" in mlflow_cmd and "--backend-store-uri" in mlflow_cmd
    assert "mlflow:5000" in mlflow_cmd, "mlflow must admit the Host header the workers send"
    assert services["mlflow"]["image"].startswith("ghcr.io/mlflow/mlflow")
    assert services["mongo"]["image"] == "mongo:7" and services["redis"]["image"] == "redis:7"
    assert any("/data/db" in v for v in services["mongo"]["volumes"])
    assert any(v.endswith(":/mlflow") for v in services["mlflow"]["volumes"])


def test_k8s_pods_build_valid_settings(monkeypatch, tmp_path):
    for name, dep in k8s("Deployment").items():
        env = pod_env(dep)
        s = settings_from_env(env, monkeypatch, tmp_path)
        assert s.broker_url.startswith("redis://") and s.effective_result_backend.startswith("redis://")
        assert s.mlflow_tracking_uri == env["MLFLOW_TRACKING_URI"]
        if "flower" not in name:
            assert s.mongo_url.startswith("mongodb://") and "@" in s.mongo_url, f"{name}: Mongo without credentials"


def test_systemd_env_example_builds_valid_settings(monkeypatch, tmp_path):
    env = env_file(SYSTEMD / "qcelery.env.example")
    s = settings_from_env(env, monkeypatch, tmp_path)
    assert s.mongo_url.startswith("mongodb://") and s.broker_url.startswith("redis://")
    assert s.mlflow_tracking_uri and env["FLOWER_BASIC_AUTH"].count(":") == 1


# ------------------------------------------------------------------------ compose
def test_the_image_is_python_311_slim_with_the_project_installed():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^RUN pip install \"?\.", text, re.M)
    for path in ("pyproject.toml", "README.md", "qcelery", "workers"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), f"the image lacks {path}"
        assert (ROOT / path).exists()
    for name in QCELERY_SERVICES:
        build = compose()["services"][name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_worker_cpu_can_be_scaled():
    svc = compose()["services"]["worker-cpu"]
    assert command_of(svc["command"]) == ("worker", ["--pool", "cpu", "--autoscale", "4,1"])
    assert "container_name" not in svc
    for port in svc.get("ports", []):  # a fixed host port would clash between replicas
        assert ":" not in str(port), f"worker-cpu publishes a host port: {port}"


def test_worker_gpu_is_a_profile_with_a_gpu():
    svc = compose()["services"]["worker-gpu"]
    assert svc["profiles"] == ["gpu"]
    assert option(command_of(svc["command"])[1], "--pool") == "gpu"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)


def test_compose_runs_exactly_one_beat():
    beats = {
        name: svc
        for name, svc in compose()["services"].items()
        if isinstance(svc.get("command"), list) and svc["command"][:2] == ["qcelery", "beat"]
    }
    assert list(beats) == ["beat"]
    assert beats["beat"].get("deploy", {}).get("replicas", 1) == 1


def test_compose_flower_requires_basic_auth_and_serves_5555():
    svc = compose()["services"]["flower"]
    sub, args = command_of(svc["command"])
    assert sub == "flower" and "--no-auth" not in args
    assert option(args, "--port") == "5555"
    assert option(args, "--address") == "0.0.0.0", "in a container Flower must listen beyond loopback"
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", svc["environment"]["FLOWER_BASIC_AUTH"])
    assert [str(p).rsplit(":", 1)[-1] for p in svc["ports"]] == ["5555"]
    assert "5555/healthcheck" in " ".join(svc["healthcheck"]["test"])


def test_compose_stop_grace_outlasts_the_lease():
    for name in QCELERY_SERVICES:
        svc = compose()["services"][name]
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert seconds(svc["stop_grace_period"]) > lease_seconds(compose_env(name)), name


# ------------------------------------------------------------------------ kubernetes
def test_k8s_manifests_are_namespace_agnostic_and_listed_in_kustomization():
    docs = k8s_docs()
    assert all("namespace" not in d.get("metadata", {}) for d in docs)
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustom["resources"])
    assert all((K8S / r).is_file() for r in listed)
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == files, "every manifest but the secret template is applied by kustomization.yaml"


def pool_of(dep: dict) -> str:
    sub, args = command_of(dep["spec"]["template"]["spec"]["containers"][0]["command"])
    assert sub == "worker"
    return option(args, "--pool") or "cpu"


def test_k8s_worker_deployments_serve_their_pool():
    deps = k8s("Deployment")
    assert pool_of(deps["qcelery-worker-cpu"]) == "cpu"
    assert pool_of(deps["qcelery-worker-gpu"]) == "gpu"
    gpu = deps["qcelery-worker-gpu"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == 1 and gpu["limits"]["nvidia.com/gpu"] == 1
    for name in ("qcelery-worker-cpu", "qcelery-worker-gpu"):
        pod = deps[name]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > lease_seconds(pod_env(deps[name])), name


def test_k8s_pods_restart_their_processes():
    for name, dep in k8s("Deployment").items():
        assert dep["spec"]["template"]["spec"]["restartPolicy"] == "Always", name


def test_compose_restarts_every_qcelery_service():
    services = compose()["services"]
    for name in QCELERY_SERVICES:
        assert services[name]["restart"] in ("always", "unless-stopped"), name


def test_k8s_runs_exactly_one_beat_with_recreate():
    beats = {
        n: d for n, d in k8s("Deployment").items() if d["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["qcelery", "beat"]
    }
    assert list(beats) == ["qcelery-beat"]
    assert beats["qcelery-beat"]["spec"]["replicas"] == 1
    assert beats["qcelery-beat"]["spec"]["strategy"]["type"] == "Recreate"
    assert not any(s["spec"]["scaleTargetRef"]["name"] == "qcelery-beat" for s in k8s("ScaledObject").values())


def test_k8s_flower_has_auth_and_its_service_reaches_the_container_port():
    dep = k8s("Deployment")["qcelery-flower"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    sub, args = command_of(container["command"])
    assert sub == "flower" and "--no-auth" not in args
    assert pod_env(dep)["FLOWER_BASIC_AUTH"].count(":") >= 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(option(args, "--port")) in ports.values()
    svc = k8s("Service")["qcelery-flower"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "the Service selects no flower pod"
    for port in svc["spec"]["ports"]:
        target = port["targetPort"]
        assert (ports[target] if isinstance(target, str) else target) in ports.values()
    for probe in ("readinessProbe", "livenessProbe"):
        target = container[probe]["httpGet"]["port"]
        assert (ports[target] if isinstance(target, str) else target) == int(option(args, "--port"))


def max_processes(deployment: dict) -> int:
    """The most pool processes one replica of a worker Deployment runs."""
    _, args = command_of(deployment["spec"]["template"]["spec"]["containers"][0]["command"])
    autoscale, concurrency = option(args, "--autoscale"), option(args, "--concurrency")
    if autoscale:
        return int(autoscale.split(",")[0])
    assert concurrency, "a worker Deployment states its processes (--concurrency or --autoscale)"
    return int(concurrency)


def mongo_triggers(so: dict) -> list[tuple[str, dict, dict]]:
    """(task pool, query, metadata) of each trigger of a ScaledObject."""
    out = []
    for trigger in so["spec"]["triggers"]:
        meta = trigger["metadata"]
        out.append((meta["collection"], json.loads(meta["query"]), meta))
    return out


def test_keda_scales_each_worker_pool_on_the_tasks_waiting_in_mongo():
    # the broker holds a bounded window of messages (issue 14), so a Redis list's length
    # no longer measures the backlog: Mongo, the queue of record, does
    deps = k8s("Deployment")
    scaled = k8s("ScaledObject")
    assert scaled, "no KEDA ScaledObject"
    for name, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        target = so["spec"]["scaleTargetRef"]["name"]
        assert target in deps, f"{name} scales a missing Deployment {target}"
        assert 0 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        env = pod_env(deps[target])
        container_env = {e["name"]: e for e in deps[target]["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        assert so["spec"]["triggers"], f"{name} has no trigger"
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == "mongodb", f"{name}: a {trigger['type']} trigger does not see the backlog in Mongo"
        statuses: dict[str, dict[str, int]] = {}
        for pool, query, meta in mongo_triggers(so):
            # the connection string is the workers' own, from the secret: never written here
            assert not {"connectionString", "password", "passwordFromEnv", "host"} & set(meta), f"{name}: credentials in the manifest"
            variable = meta["connectionStringFromEnv"]
            assert variable == "QCELERY_MONGO_URL"
            assert "secretKeyRef" in container_env[variable]["valueFrom"], f"{name}: {variable} does not come from the secret"
            assert meta["dbName"] == env["QCELERY_MONGO_DB"], f"{name} counts in another database than the workers use"
            check_name(pool)  # a collection qcelery accepts as a task pool
            assert set(query) == {"status"} and query["status"] in (st.WAITING, st.RUNNING), f"{name}: query {query}"
            statuses.setdefault(pool, {})[query["status"]] = int(meta["queryValue"])
            assert int(meta["queryValue"]) >= 1
            assert int(meta.get("activationQueryValue", 0)) >= 0
        for pool, targets in statuses.items():
            assert st.WAITING in targets, f"{name}: pool {pool} has no trigger on its waiting tasks"
            # a replica per this many running tasks = its processes: a draining backlog
            # does not scale away the workers running the pool's last tasks
            assert targets.get(st.RUNNING) == max_processes(deps[target]), f"{name}: running target of pool {pool}"
    workers = {n for n, d in deps.items() if d["spec"]["template"]["spec"]["containers"][0]["command"][1] == "worker"}
    assert {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()} == workers
    # every worker serves the control queue (aggregations, beat jobs): one must always run
    assert any(so["spec"]["minReplicaCount"] >= 1 for so in scaled.values())


def test_keda_queries_count_what_qcelery_status_counts(settings):
    """The triggers' queries run on a real pool: each counts exactly the tasks in its
    status, as ``task_stat`` (what ``qcelery status`` shows) does."""
    from qcelery.manage import TaskManager

    queries = {(pool, json.dumps(q, sort_keys=True)) for so in k8s("ScaledObject").values() for pool, q, _ in mongo_triggers(so)}
    for pool in {p for p, _ in queries}:
        tm = TaskManager(pool, settings)
        tm.create_task([{"key": i} for i in range(7)])
        for _ in range(3):
            assert tm.fetch_task() is not None  # waiting -> running
        stat = tm.task_stat()
        assert stat == {st.WAITING: 4, st.RUNNING: 3}
        for _, text in (q for q in queries if q[0] == pool):
            query = json.loads(text)
            assert tm.task_pool.count_documents(query) == stat[query["status"]]


# ------------------------------------------------------------------------ systemd
UNITS = ("qcelery-worker@.service", "qcelery-beat.service", "qcelery-flower.service")


@pytest.mark.parametrize("name", UNITS)
def test_systemd_units_read_the_env_file_stop_gently_and_always_come_back(name):
    service = unit(SYSTEMD / name)["Service"]
    assert service["EnvironmentFile"] == "/etc/qcelery/qcelery.env"
    assert service["KillSignal"] == "SIGTERM"
    # restarted after any exit (a kill -9, an OOM kill, a clean exit) and never given up on
    assert service["Restart"] == "always"
    assert 0 < seconds(service["RestartSec"]) <= 30
    assert unit(SYSTEMD / name)["Unit"]["StartLimitIntervalSec"] == "0"
    assert seconds(service["TimeoutStopSec"]) > lease_seconds(env_file(SYSTEMD / "qcelery.env.example"))
    assert unit(SYSTEMD / name)["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_worker_instance_is_the_pool():
    sub, args = command_of(shlex.split(unit(SYSTEMD / "qcelery-worker@.service")["Service"]["ExecStart"]))
    assert sub == "worker" and option(args, "--pool") == "%i"


def test_systemd_beat_and_flower_commands():
    assert command_of(shlex.split(unit(SYSTEMD / "qcelery-beat.service")["Service"]["ExecStart"])) == ("beat", [])
    sub, args = command_of(shlex.split(unit(SYSTEMD / "qcelery-flower.service")["Service"]["ExecStart"]))
    assert sub == "flower" and "--no-auth" not in args and option(args, "--port") == "5555"
    assert "FLOWER_BASIC_AUTH" in env_file(SYSTEMD / "qcelery.env.example")


# ------------------------------------------------------------------------ across deployments
def test_every_deployment_runs_the_same_known_pools():
    from workers.pools import POOLS

    compose_pools = {option(command_of(compose()["services"][n]["command"])[1], "--pool") for n in ("worker-cpu", "worker-gpu")}
    k8s_pools = {pool_of(d) for n, d in k8s("Deployment").items() if n.startswith("qcelery-worker-")}
    deps = k8s("Deployment")
    keda_pools = {pool_of(deps[so["spec"]["scaleTargetRef"]["name"]]) for so in k8s("ScaledObject").values()}
    assert compose_pools == k8s_pools == keda_pools == set(POOLS)
    # the queue tasks go to by default is served everywhere
    assert Settings.model_fields["default_queue"].default in compose_pools


def test_readme_mentions_each_deployment():
    text = (DEPLOY / "README.md").read_text()
    for word in ("docker compose", "kubectl apply -k", "systemctl enable", "FLOWER_BASIC_AUTH", "--scale worker-cpu"):
        assert word in text
