"""The deployment files, checked without a Docker engine.

`docker-compose.yml` is validated against the Compose Specification's JSON schema (in the shared
folder beside the repo) and every file it mounts, every Dockerfile it builds and every command it
runs is looked up in the repo: gateway commands against the `gateway` CLI, locust commands against
the locustfile. The Dockerfile is read instruction by instruction. Prometheus' config goes through
`promtool check config` (which does not resolve DNS service discovery names, so compose's service
names pass on a machine without them), and every dashboard query, with Grafana's variables
substituted, through `promtool check rules` as a PromQL parse. Whether the queries return data is
for a test with a real Prometheus scraping a real gateway.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from tests.dashboards import ALL, grafana_substitute, panel_queries

REPO = Path(__file__).resolve().parents[2]
COMPOSE_SCHEMA = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "compose-spec.json"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = REPO / "grafana" / "dashboards"
PROVISIONING = REPO / "grafana" / "provisioning"

GATEWAY_COMMANDS = ("run", "api", "worker", "sandbox")
GATEWAY_PORT = 8080
DATASOURCE_UID = "prometheus"

# The metrics the gateway exports (gateway/metrics.py), with their labels: the dashboards' contract.
COUNTERS = {
    "gateway_messages_accepted": {"category", "tier"},
    "gateway_messages_sent": {"tier"},
    "gateway_messages_failed": {"reason"},
    "gateway_upstream_requests": {"outcome"},
    "gateway_rate_limited": {"tier"},
    "gateway_number_paused": {"reason"},
    "gateway_http_requests": {"route", "status"},
    "gateway_redis_errors": set(),
}
HISTOGRAMS = {
    "gateway_upstream_request_duration_seconds": set(),
    "gateway_send_delay_seconds": set(),
    "gateway_http_request_duration_seconds": {"route"},
}
GAUGES = {
    "gateway_queue_depth": {"tier", "lane"},
    "gateway_inflight": set(),
    "gateway_numbers": {"status", "tier"},
    "gateway_tier_capacity_messages_per_second": {"tier"},
    "gateway_backlog_eta_seconds": {"tier"},
}
# Labels every series gets from the scrape (and `pid` from multiprocess gauges).
SCRAPE_LABELS = {"job", "instance", "role", "pid"}


def _contract_samples() -> dict[str, set[str]]:
    """Sample name → labels it may carry."""
    samples = {f"{name}_total": labels for name, labels in COUNTERS.items()}
    for name, labels in HISTOGRAMS.items():
        samples[f"{name}_bucket"] = labels | {"le"}
        samples[f"{name}_sum"] = labels
        samples[f"{name}_count"] = labels
    samples.update(GAUGES)
    return samples


# --- loading ----------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict), "docker-compose.yml is not a mapping"
    return loaded


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


@cache
def dockerfile() -> tuple[tuple[str, str], ...]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return tuple(instructions)


def instructions(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile() if kw == keyword]


def _exec_form(arguments: str) -> list[str]:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        pytest.fail(f"not in exec (JSON array) form: {arguments}")
    assert isinstance(value, list), f"not in exec (JSON array) form: {arguments}"
    return [str(v) for v in value]


def _without_flags(arguments: str) -> str:
    """`--interval=10s CMD [...]` → `CMD [...]`: drops an instruction's leading `--flag`s."""
    return re.sub(r"^(?:\s*--\S+)*\s*", "", arguments)


_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:-|-|:\?|\?)(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)"
)


def interpolate(value: str, environment: Mapping[str, str]) -> str:
    """Compose's variable interpolation, for the forms a compose file here may use."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = environment.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?") and not current:
            pytest.fail(f"${{{name}}} is required: {arg}")
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as the container sees it, with only the file's own defaults."""
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {k: interpolate(str(v), {}) for k, v in raw.items() if v is not None}


def command_of(name: str, service: Mapping[str, Any]) -> list[str]:
    """The arguments a service passes to its image's entrypoint (the Dockerfile CMD if none)."""
    command = service.get("command")
    if command is None:
        if "build" not in service:
            pytest.fail(f"{name}: no command, and its image's default is not in this repo")
        return _exec_form(instructions("CMD")[-1])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def built_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if "build" in svc}


def bind_mounts(service: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(host source as written, container target) of each bind mount of a service."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) >= 2 and parts[0].startswith((".", "/", "~")):
                yield parts[0], parts[1]
        elif volume.get("type") == "bind":
            yield volume["source"], volume["target"]


def named_volumes(service: Mapping[str, Any]) -> Iterator[str]:
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":")[0]
            if ":" in volume and not source.startswith((".", "/", "~")):
                yield source
        elif volume.get("type") == "volume" and volume.get("source"):
            yield volume["source"]


def host_path(source: str) -> Path:
    return (COMPOSE_FILE.parent / source).resolve()


def container_to_host(service: Mapping[str, Any], container_path: str) -> Path | None:
    """The repo file behind a path inside a service's container, through its bind mounts."""
    target_path = PurePosixPath(container_path)
    for source, target in bind_mounts(service):
        mount = PurePosixPath(target)
        if target_path == mount or mount in target_path.parents:
            return host_path(source) / target_path.relative_to(mount)
    return None


def promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if found is None:
        pytest.fail(
            "promtool is not installed (Debian/Ubuntu: apt-get install prometheus; .ci/run does "
            "this): it checks the Prometheus config and the dashboards' PromQL"
        )
    return found


def gateway_parser() -> Any | None:
    """`gateway.cli.build_parser()` when the package has it, else None."""
    try:
        cli = importlib.import_module("gateway.cli")
    except ImportError:
        return None
    build_parser = getattr(cli, "build_parser", None)
    return build_parser() if callable(build_parser) else None


def subcommands(parser: Any) -> set[str]:
    names: set[str] = set()
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if getattr(action, "dest", None) == "command" and isinstance(choices, Mapping):
            names |= set(choices)
    return names


# --- docker-compose.yml -----------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    if not COMPOSE_SCHEMA.is_file():
        pytest.fail(
            f"the Compose Specification schema is missing at {COMPOSE_SCHEMA}: it ships in the "
            "shared folder beside the repo (shared/schemas/compose-spec.json)"
        )
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The schema says draft-07 as `.../draft-07/schema` (no `#`), which jsonschema does not
    # recognise by name: draft-07 is the default then.
    validator_class = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft7Validator
    )
    validator_class.check_schema(schema)
    errors = sorted(
        validator_class(schema).iter_errors(compose()), key=lambda e: list(e.absolute_path)
    )
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors
    )
    assert "version" not in compose(), "the Compose Specification has no `version:` key"


def test_compose_has_every_service_of_the_deployment() -> None:
    expected = {
        "redis",
        "sandbox",
        "gateway-api",
        "gateway-worker",
        "prometheus",
        "grafana",
        "locust-master",
        "locust-worker",
    }
    assert expected <= set(services()), f"missing: {sorted(expected - set(services()))}"


def test_every_bind_mount_is_a_path_in_the_repo() -> None:
    mounts = [(name, *m) for name, svc in services().items() for m in bind_mounts(svc)]
    assert mounts, "no bind mounts found: the parser or the file changed"
    for name, source, target in mounts:
        path = host_path(source)
        assert path.is_relative_to(REPO), f"{name}: {source} is outside the repo"
        assert path.exists(), f"{name}: {source} (mounted at {target}) does not exist"


def test_every_named_volume_is_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for volume in named_volumes(service):
            assert volume in declared, f"{name}: volume {volume!r} is not declared"


def test_every_build_names_an_existing_dockerfile() -> None:
    assert built_services(), "no service is built from the repo"
    for name, service in built_services().items():
        build = service["build"]
        context = host_path(build if isinstance(build, str) else build.get("context", "."))
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        dockerfile_name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
        assert (context / (dockerfile_name or "Dockerfile")).is_file(), (
            f"{name}: {dockerfile_name} not found in {context}"
        )


def test_every_gateway_command_is_a_real_subcommand() -> None:
    parser = gateway_parser()
    cli_subcommands = subcommands(parser) if parser is not None else None
    if parser is not None:
        assert cli_subcommands, "gateway.cli.build_parser() has no subcommands"
    for name, service in built_services().items():
        assert service.get("entrypoint") in (None, ["gateway"]), f"{name}: entrypoint replaced"
        command = command_of(name, service)
        assert command and command[0] in GATEWAY_COMMANDS, (
            f"{name}: `gateway {' '.join(command)}` is not one of {GATEWAY_COMMANDS}"
        )
        if parser is None:
            continue
        assert cli_subcommands is not None and command[0] in cli_subcommands, (
            f"{name}: `{command[0]}` is not a subcommand of gateway.cli ({cli_subcommands})"
        )
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(command)
            except SystemExit:
                message = (errors.getvalue().strip().splitlines() or ["rejected"])[-1]
                pytest.fail(f"{name}: `gateway {shlex.join(command)}`: {message}")


def test_gateway_settings_in_compose_are_real_and_valid() -> None:
    """Every GATEWAY_* variable is a setting, and with the file's defaults they load as one."""
    try:
        settings = importlib.import_module("gateway.settings")
    except ImportError:
        settings = None
    known = (
        {settings.env_name(f.name) for f in settings.FIELDS}
        if settings is not None and hasattr(settings, "FIELDS")
        else None
    )
    for name, service in built_services().items():
        environment = environment_of(service)
        gateway_env = {k: v for k, v in environment.items() if k.startswith("GATEWAY_")}
        if known is not None:
            unknown = set(gateway_env) - known
            assert not unknown, f"{name}: not gateway settings: {sorted(unknown)}"
        if settings is not None and hasattr(settings, "load"):
            try:
                settings.load(env=gateway_env)
            except Exception as exc:
                pytest.fail(f"{name}: its environment does not load as settings: {exc}")


def test_gateway_services_are_wired_to_redis_and_the_sandbox() -> None:
    for role in ("gateway-api", "gateway-worker"):
        service = services()[role]
        environment = environment_of(service)
        assert environment["GATEWAY_REDIS_URL"] == "redis://redis:6379/0", role
        assert environment["GATEWAY_UPSTREAM_URL"] == "http://sandbox:8090/v21.0", role
        assert environment["GATEWAY_LOG_FORMAT"] == "json", role
        for secret in ("GATEWAY_API_KEYS", "GATEWAY_ADMIN_KEYS", "GATEWAY_WEBHOOK_SECRET"):
            raw = str(service["environment"][secret])
            assert raw.startswith(f"${{{secret}:-"), f"{role}: {secret} is not taken from the env"
            assert environment[secret], f"{role}: {secret} has no dev default"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", role
        assert environment.get("GATEWAY_HOST", "0.0.0.0") == "0.0.0.0", role
    assert services()["gateway-api"]["ports"], "the API publishes no port"
    worker = services()["gateway-worker"]
    assert "ports" not in worker, "workers publish no port (several replicas could not share it)"
    assert "container_name" not in worker, "a container_name would prevent scaling"
    assert worker["deploy"]["replicas"] == 2
    sandbox_command = command_of("sandbox", services()["sandbox"])
    assert sandbox_command == ["sandbox", "--host", "0.0.0.0", "--port", "8090"]


def test_health_conditions_name_services_with_a_health_check() -> None:
    image_has_check = any(
        not _without_flags(h).upper().startswith("NONE") for h in instructions("HEALTHCHECK")
    )
    for name, service in services().items():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            depends_on = {d: {"condition": "service_started"} for d in depends_on}
        for dependency, spec in depends_on.items():
            assert dependency in services(), f"{name} depends on unknown service {dependency}"
            if spec.get("condition") != "service_healthy":
                continue
            other = services()[dependency]
            has_check = "healthcheck" in other or ("build" in other and image_has_check)
            assert has_check and not other.get("healthcheck", {}).get("disable", False), (
                f"{name} waits for {dependency} to be healthy, but it has no health check"
            )


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = services()["redis"]
    assert redis["image"].startswith("valkey/valkey:")
    command = command_of("redis", redis)
    assert "--appendonly" in command
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(target == "/data" for target in _volume_targets(redis)), "no volume on /data"
    assert list(named_volumes(redis)), "redis data is not on a named volume"
    assert "valkey-cli" in redis["healthcheck"]["test"]


def _volume_targets(service: Mapping[str, Any]) -> list[str]:
    targets = []
    for volume in service.get("volumes", []):
        targets.append(volume.split(":")[1] if isinstance(volume, str) else volume["target"])
    return targets


def test_locust_runs_the_locustfile_of_the_repo() -> None:
    locusts = {n: s for n, s in services().items() if s.get("image", "").startswith("locustio/")}
    assert set(locusts) == {"locust-master", "locust-worker"}
    for name, service in locusts.items():
        command = command_of(name, service)
        flag = next((f for f in ("-f", "--locustfile") if f in command), None)
        assert flag is not None, f"{name}: no -f/--locustfile"
        locustfile = command[command.index(flag) + 1]
        on_host = container_to_host(service, locustfile)
        assert on_host is not None, f"{name}: {locustfile} is not inside a bind mount"
        assert on_host == REPO / "bench" / "locustfile.py", on_host
        assert on_host.is_file(), f"{name}: {on_host} does not exist"
    master = command_of("locust-master", locusts["locust-master"])
    assert "--master" in master
    assert master[master.index("--host") + 1] == f"http://gateway-api:{GATEWAY_PORT}"
    worker = command_of("locust-worker", locusts["locust-worker"])
    assert "--worker" in worker
    assert worker[worker.index("--master-host") + 1] == "locust-master"
    assert any("8089" in str(p) for p in locusts["locust-master"]["ports"])


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_is_a_slim_multi_stage_build() -> None:
    arguments = dict(
        a.split("=", 1) for kw, a in dockerfile() if kw == "ARG" and "=" in a
    )  # ARG defaults, for FROM ${PYTHON_IMAGE}
    stages = [interpolate(f.split(" ")[0], arguments) for f in instructions("FROM")]
    assert len(stages) >= 2, "not a multi-stage build"
    assert all(stage == "python:3.11-slim" for stage in stages), stages
    assert any("pip wheel" in run for run in instructions("RUN")), "no `pip wheel` stage"
    for copy in instructions("COPY"):
        words = [w for w in copy.split() if not w.startswith("--")]
        if "--from" in copy:
            continue
        for source in words[:-1]:
            if not any(ch in source for ch in "*?["):
                assert (REPO / source).exists(), f"COPY source {source} does not exist"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = instructions("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"


def test_dockerfile_has_a_health_check_on_healthz() -> None:
    checks = instructions("HEALTHCHECK")
    assert checks, "no HEALTHCHECK"
    check = _without_flags(checks[-1])
    assert check.startswith("CMD"), check
    assert "/healthz" in check and "urllib" in check, check


def test_dockerfile_entrypoint_is_gateway() -> None:
    assert _exec_form(instructions("ENTRYPOINT")[-1]) == ["gateway"]
    default = _exec_form(instructions("CMD")[-1])
    assert default == ["run"]
    assert str(GATEWAY_PORT) in " ".join(instructions("EXPOSE"))
    environment = " ".join(instructions("ENV"))
    assert "GATEWAY_DATA_DIR=/data" in environment
    assert any("/data" in v for v in instructions("VOLUME"))


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".venv", ".git", ".gateway", "bench/results"):
        assert entry in ignored, f".dockerignore does not exclude {entry}"
    for needed in ("pyproject.toml", "gateway", "README.md"):
        assert needed not in ignored, f".dockerignore excludes {needed}, which the build needs"


# --- Prometheus -------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_gateway_container() -> None:
    prometheus = services()["prometheus"]
    assert container_to_host(prometheus, "/etc/prometheus/prometheus.yml") == PROMETHEUS_CONFIG
    assert all(v.endswith(":ro") for v in prometheus["volumes"] if "prometheus.yml" in str(v)), (
        "the config is not mounted read-only"
    )
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for service, role in (("gateway-api", "api"), ("gateway-worker", "worker")):
        assert service in services()
        job = jobs[service]
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [service]
        assert sd["type"] == "A"
        assert sd["port"] == GATEWAY_PORT
        labels = {r.get("target_label"): r.get("replacement") for r in job["relabel_configs"]}
        assert labels.get("role") == role, f"job {service} is not labelled role={role}"


# --- Grafana ----------------------------------------------------------------------------------


def dashboard_files() -> list[Path]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    return files


def load_dashboard(path: Path) -> dict[str, Any]:
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        pytest.fail(f"{path.name} is not valid JSON: {exc}")
    assert isinstance(dashboard, dict), f"{path.name} is not a JSON object"
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def test_grafana_provisioning_points_at_the_mounted_folders() -> None:
    grafana = services()["grafana"]
    assert container_to_host(grafana, "/etc/grafana/provisioning") == PROVISIONING
    environment = environment_of(grafana)
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    providers_file = PROVISIONING / "dashboards" / "dashboards.yml"
    providers = yaml.safe_load(providers_file.read_text())["providers"]
    assert providers, "no dashboard provider"
    for provider in providers:
        assert provider["type"] == "file"
        folder = container_to_host(grafana, provider["options"]["path"])
        assert folder == DASHBOARDS, f"provider {provider['name']} reads {folder}, not {DASHBOARDS}"

    home = container_to_host(grafana, environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.is_file(), f"the home dashboard {home} does not exist"
    assert home.parent == DASHBOARDS

    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in services()
    for path in PROVISIONING.rglob("*"):
        if path.suffix in (".yml", ".yaml"):
            assert isinstance(yaml.safe_load(path.read_text()), dict), f"{path} is not a mapping"


def test_dashboards_are_well_formed() -> None:
    uids = set()
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        assert dashboard.get("uid"), f"{path.name}: no uid"
        assert dashboard["uid"] not in uids, f"{path.name}: uid {dashboard['uid']} used twice"
        uids.add(dashboard["uid"])
        assert dashboard.get("title"), f"{path.name}: no title"
        assert dashboard.get("schemaVersion", 0) >= 39, f"{path.name}: schemaVersion < 39"
        panels = list(all_panels(dashboard.get("panels", [])))
        assert panels, f"{path.name}: no panels"
        ids = [panel.get("id") for panel in panels]
        assert None not in ids, f"{path.name}: a panel has no id"
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat: {sorted(map(str, ids))}"
        for panel in panels:
            where = f"{path.name}: panel {panel.get('id')} {panel.get('title')!r}"
            assert str(panel.get("description", "")).strip(), f"{where} has no description"
            assert panel.get("title"), f"{where} has no title"
            for source in [panel.get("datasource")] + [
                t.get("datasource") for t in panel.get("targets", [])
            ]:
                if source is not None:
                    assert source == {"type": "prometheus", "uid": DATASOURCE_UID}, where
        for variable in dashboard.get("templating", {}).get("list", []):
            source = variable.get("datasource")
            if source is not None:
                assert source.get("uid") == DATASOURCE_UID, f"{path.name}: ${variable['name']}"


def test_gateway_dashboard_has_the_tier_variable() -> None:
    dashboard = load_dashboard(DASHBOARDS / "gateway.json")
    assert dashboard["uid"] == "gateway-overview"
    assert dashboard["title"] == "WhatsApp send gateway"
    (tier,) = [v for v in dashboard["templating"]["list"] if v["name"] == "tier"]
    query = tier["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(gateway_messages_sent_total, tier)"
    assert tier["multi"] is True
    assert tier["includeAll"] is True


_SELECTOR = re.compile(r"\b(gateway_[a-z0-9_]+)\b(?:\{([^}]*)\})?")
_MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_RANGE_WINDOW = re.compile(r"\b(rate|irate|increase)\((.*?)\[([^\]]+)\]")


def exported_samples() -> dict[str, set[str] | None]:
    """Sample names the gateway exports → their labels (None: not known without the contract)."""
    contract: dict[str, set[str] | None] = dict(_contract_samples())
    try:
        metrics = importlib.import_module("gateway.metrics")
    except ImportError:
        return contract
    from prometheus_client.metrics import MetricWrapperBase

    exported: dict[str, set[str] | None] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            if family.type == "counter":
                names = [f"{family.name}_total"]
            elif family.type == "histogram":
                names = [f"{family.name}_{s}" for s in ("bucket", "sum", "count")]
            else:
                names = [family.name]
            for name in names:
                exported[name] = contract.get(name)
    return exported


def test_dashboard_queries_use_exported_metrics_and_labels() -> None:
    samples = exported_samples()
    for path in dashboard_files():
        for title, expr in panel_queries(load_dashboard(path)):
            for match in _SELECTOR.finditer(expr):
                name, matchers = match.group(1), match.group(2) or ""
                assert name in samples, f"{path.name} {title!r}: {name} is not exported"
                labels = samples[name]
                if labels is None:
                    continue
                for label in _MATCHER_LABEL.findall(matchers):
                    assert label in labels | SCRAPE_LABELS, (
                        f"{path.name} {title!r}: {name} has no label {label!r}"
                    )


def test_dashboard_rates_use_the_rate_interval() -> None:
    for path in dashboard_files():
        for title, expr in panel_queries(load_dashboard(path)):
            for function, _, window in _RANGE_WINDOW.findall(expr):
                allowed = {"$__rate_interval"} | ({"$__range"} if function == "increase" else set())
                assert window in allowed, f"{path.name} {title!r}: {function}(...[{window}])"


@pytest.mark.parametrize(
    "tier",
    [ALL, "standard", ["standard", "high"]],
    ids=["all", "one", "several"],
)
def test_dashboard_queries_parse_as_promql(tier: str | list[str], tmp_path: Path) -> None:
    queries = [
        (f"{path.name}: {title}", grafana_substitute(expr, variables={"tier": tier}))
        for path in dashboard_files()
        for title, expr in panel_queries(load_dashboard(path))
    ]
    assert queries, "no dashboard queries"
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard_query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run(
        [promtool(), "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    listing = "\n".join(f"dashboard_query_{i}: {t}: {e}" for i, (t, e) in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{listing}"
    assert "$" not in "".join(e for _, e in queries), "a Grafana variable was left unsubstituted"


def test_the_cluster_profile_runs_three_primaries_with_a_replica_each() -> None:
    nodes = {
        n: s for n, s in services().items() if n.startswith("redis-cluster-") and n[-1].isdigit()
    }
    assert len(nodes) == 6
    for name, node in nodes.items():
        assert node["profiles"] == ["cluster"], name
        command = command_of(name, node)
        assert command[command.index("--cluster-enabled") + 1] == "yes", name
        assert command[command.index("--appendonly") + 1] == "yes", name
        assert list(named_volumes(node)), f"{name}: its data is not on a named volume"
    init = services()["redis-cluster-init"]
    assert init["profiles"] == ["cluster"]
    script = " ".join(command_of("redis-cluster-init", init))
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert set(init["depends_on"]) == set(nodes)
    # the gateway services take the cluster's seed nodes from the environment
    raw = str(services()["gateway-api"]["environment"]["GATEWAY_REDIS_URL"])
    assert raw.startswith("${GATEWAY_REDIS_URL:-"), raw
