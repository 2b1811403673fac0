"""Deployment artifacts, checked offline: Dockerfiles, docker-compose.yml, the kustomize overlays,
the Prometheus rules and the Grafana dashboard.

No Docker engine or cluster exists here, so what can be checked without one is: each Dockerfile
parses, copies only paths that exist and reach the build context, installs what its entry point
needs and runs as a numeric non-root user; the compose file matches the compose-spec schema; every
overlay renders with `kubectl kustomize` and passes `kubernetes-validate --strict`; the seed
Secret reaches only the two signers; and the alert rules and dashboard use metrics the services
export (or ones listed below as still to be added).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
import yaml

from otc_cli.devstack import DEV_CHAINS
from otc_common.keys import EscrowKeyring
from otc_common.registry import ChainKind, parse_registry
from otc_common.settings import BaseSettings, env_name
from otc_common.subjects import ConsumerSpec

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
K8S = REPO / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if (path / "kustomization.yaml").exists())
OPTIONAL = sorted(path.name for path in (K8S / "optional").iterdir() if (path / "kustomization.yaml").exists())
#: The oldest Kubernetes the manifests are meant for, and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", None)
SIGNERS = {"queue-processor", "tank"}
TEST_SEED_HEX = (K8S / "overlays" / "dev" / "dev-seed.hex").read_text().strip()
#: Where anvil account 0's first contract lands on a fresh chain (tests/support.py FIRST_CONTRACT).
FIRST_CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"

#: Metrics the alert rules and the dashboard use that no service exports yet: the rules and panels
#: that need them stay silent until the named service adds them.
PENDING_METRICS: dict[str, str] = {}


def tool(name: str) -> str:
    """A console script of the dev environment (kubectl, kubernetes-validate, check-jsonschema)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is missing: it is a dev dependency (uv sync)"
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


# --- Dockerfiles ------------------------------------------------------------------------------

INSTRUCTIONS = {
    "FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD",
    "LABEL", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD",
}  # fmt: skip


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        flags: dict[str, str] = {}
        words: list[str] = []
        for word in self.args.split():
            if word.startswith("--") and not words:
                key, _, value = word[2:].partition("=")
                flags[key] = value
            else:
                words.append(word)
        return flags, words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined; an unknown instruction fails."""
    logical: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    assert not pending, f"{path.name}: the file ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        assert keyword in INSTRUCTIONS, f"{path.name}:{number}: unknown instruction {keyword!r}"
        if keyword == "ARG" and not stages:
            name, _, default = rest.strip().partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            words = rest.split()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias))
            continue
        assert stages, f"{path.name}:{number}: {keyword} before FROM"
        stages[-1].instructions.append(Instruction(keyword, rest.strip(), number))
    return Dockerfile(path, args, stages)


def dockerignore_patterns() -> list[re.Pattern[str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions in .dockerignore are not modelled by this test"
        regex = ""
        parts = re.split(r"(\*\*/|\*|\?)", line.strip("/"))
        for part in parts:
            regex += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append(re.compile(regex))
    return patterns


def ignored(relative: str) -> bool:
    """Whether the build context leaves out this path (itself or a parent directory matched)."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(pattern.fullmatch(prefix) for pattern in dockerignore_patterns() for prefix in prefixes)


@cache
def workspace() -> dict[str, dict[str, Any]]:
    """Workspace members from uv.lock: name -> {"dir": ..., "deps": [member names]}."""
    lock = tomllib.loads((REPO / "uv.lock").read_text(encoding="utf-8"))
    members: dict[str, dict[str, Any]] = {}
    for package in lock["package"]:
        source = package.get("source", {})
        directory = source.get("editable") or source.get("virtual")
        if directory and directory != ".":
            members[package["name"]] = {"dir": directory, "deps": [d["name"] for d in package.get("dependencies", [])]}
    for member in members.values():
        member["deps"] = [d for d in member["deps"] if d in members]
    return members


def member_closure(name: str) -> set[str]:
    seen = {name}
    todo = [name]
    while todo:
        for dep in workspace()[todo.pop()]["deps"]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


@cache
def installed_closure(name: str) -> set[str]:
    """Every distribution (workspace member or third party) that installing `name` from uv.lock brings."""
    lock = tomllib.loads((REPO / "uv.lock").read_text(encoding="utf-8"))
    dependencies = {
        canonical(package["name"]): [canonical(d["name"]) for d in package.get("dependencies", [])]
        for package in lock["package"]
    }
    seen = {canonical(name)}
    todo = [canonical(name)]
    while todo:
        for dep in dependencies.get(todo.pop(), []):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def imported_top_level_modules(source: Path) -> dict[str, str]:
    """Absolute imports of the package's sources: top-level module -> a file importing it."""
    found: dict[str, str] = {}
    for path in sorted(source.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("member", sorted(workspace()))
def test_every_import_is_a_declared_dependency(member: str) -> None:
    """An image installs a package with its locked dependencies only (uv sync --package --no-dev): an
    import that the workspace's dev environment happens to provide would fail there at start-up."""
    source = REPO / workspace()[member]["dir"] / "src"
    own = {path.name for path in source.iterdir() if path.is_dir()}
    providers = importlib.metadata.packages_distributions()
    members = {name.replace("-", "_"): name for name in workspace()}
    missing = []
    for module, where in imported_top_level_modules(source).items():
        if module in sys.stdlib_module_names or module in own or module == "__future__":
            continue
        candidates = {canonical(d) for d in providers.get(module, [])} or {canonical(members.get(module, module))}
        if not candidates & installed_closure(member):
            missing.append(f"{module} ({where}; from {', '.join(sorted(candidates))})")
    assert not missing, f"{member} imports what its pyproject.toml does not bring: {missing}"


DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def test_every_service_and_the_devnet_have_a_dockerfile() -> None:
    modules = {"otc_gateway", "otc_engine", "otc_queue", "otc_tank", "otc_watcher_evm", "otc_watcher_utxo"}
    entry = {}
    for path in DOCKERFILES:
        final = parse_dockerfile(path).final.all("ENTRYPOINT")
        entry[path.name] = json.loads(final[-1].args) if final else []
    started = {argv[2] for argv in entry.values() if argv[:2] == ["python", "-m"]}
    assert modules <= started, f"no image runs {sorted(modules - started)}"
    assert ["otc-devnet"] in entry.values(), "no image runs the UTXO devnet"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_from_existing_paths_in_the_context(path: Path) -> None:
    dockerfile = parse_dockerfile(path)
    assert len(dockerfile.stages) >= 3, "multi-stage: uv, builder, final"
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            assert instruction.keyword == "COPY", f"{path.name}:{instruction.line}: use COPY, not ADD"
            flags, words = instruction.flags_and_words()
            if "from" in flags:
                continue
            *sources, _destination = words
            assert sources, f"{path.name}:{instruction.line}: COPY without a source"
            for source in sources:
                assert not source.startswith(("/", "..")), (
                    f"{path.name}:{instruction.line}: {source} leaves the context"
                )
                assert (REPO / source).exists(), f"{path.name}:{instruction.line}: {source} does not exist"
                assert not ignored(source), f"{path.name}:{instruction.line}: .dockerignore leaves out {source}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_final_stage_is_slim_and_runs_as_non_root(path: Path) -> None:
    dockerfile = parse_dockerfile(path)
    final = dockerfile.final
    builder = dockerfile.stages[-2]
    assert dockerfile.resolve(final.base) == "python:3.11-slim"
    # The venv's interpreter symlink must resolve in the final image: same base as the builder.
    assert dockerfile.resolve(builder.base) == dockerfile.resolve(final.base)
    users = final.all("USER")
    assert users, "the final stage must set USER"
    assert final.instructions.index(users[-1]) > max(
        (final.instructions.index(i) for i in final.all("RUN") + final.all("COPY")), default=-1
    ), "USER comes after everything that needs root"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) > 0, "a numeric non-root uid, so Kubernetes can verify runAsNonRoot"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    for instruction in final.all("RUN"):
        assert not re.search(r"apt-get install|pip install|uv ", instruction.args), "no build tools in the final image"
    copied = [i.flags_and_words() for i in final.all("COPY")]
    assert any(flags.get("from") == builder.name and words[0] == "/opt/venv" for flags, words in copied)
    assert not any(flags.get("from") == "uv" for flags, _ in copied), "uv stays in the builder"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_its_package_with_the_workspace_members_it_needs(path: Path) -> None:
    dockerfile = parse_dockerfile(path)
    builder = dockerfile.stages[-2]
    syncs = [i for i in builder.all("RUN") if "uv sync" in i.args]
    assert len(syncs) == 2, "one sync from the lock alone, then one with the sources"
    packages = {re.search(r"--package (\S+)", s.args).group(1) for s in syncs}  # type: ignore[union-attr]
    assert len(packages) == 1
    package = packages.pop()
    for sync in syncs:
        assert "--frozen" in sync.args and "--no-dev" in sync.args, "installs exactly the lock, no dev tools"
    assert "--no-install-workspace" in syncs[0].args
    assert "--no-editable" in syncs[1].args, "the final image gets the venv alone, not the sources"

    members = member_closure(package)
    directories = [workspace()[m]["dir"] for m in members]
    copies = [(i, i.flags_and_words()[1]) for i in builder.all("COPY")]
    first_sync = builder.instructions.index(syncs[0])
    second_sync = builder.instructions.index(syncs[1])
    for directory in directories:
        pyproject = [i for i, words in copies if words[0] == f"{directory}/pyproject.toml"]
        source = [i for i, words in copies if words[0] == directory]
        assert pyproject and builder.instructions.index(pyproject[0]) < first_sync, f"{directory}/pyproject.toml"
        assert source, f"{path.name} does not copy {directory}, which {package} needs"
        assert first_sync < builder.instructions.index(source[0]) < second_sync
    lock_copy = [i for i, words in copies if "uv.lock" in words]
    assert lock_copy and builder.instructions.index(lock_copy[0]) < first_sync
    # Shared layers first: the common library's sources before the package's own.
    if "otc-common" in members and package != "otc-common":
        order = [words[0] for _, words in copies]
        own = workspace()[package]["dir"]
        assert order.index(workspace()["otc-common"]["dir"]) < order.index(own)

    entrypoint = json.loads(dockerfile.final.all("ENTRYPOINT")[-1].args)
    own_dir = REPO / workspace()[package]["dir"]
    if entrypoint[:2] == ["python", "-m"]:
        module = entrypoint[2]
        assert (own_dir / "src" / module / "__main__.py").exists(), f"{module} has no __main__ in {package}"
    else:
        scripts = tomllib.loads((own_dir / "pyproject.toml").read_text())["project"].get("scripts", {})
        assert entrypoint[0] in scripts, f"{entrypoint[0]} is not a console script of {package}"
        module = scripts[entrypoint[0]].split(":")[0]
        assert (own_dir / "src" / Path(*module.split("."))).with_suffix(".py").exists(), module


def test_the_dockerfile_parser_rejects_what_it_should(tmp_path: Path) -> None:
    broken = tmp_path / "broken.Dockerfile"
    broken.write_text("FROM python:3.11-slim\nENV A=1 \\\n    B=2\n    C=3\n")
    with pytest.raises(AssertionError, match="unknown instruction"):
        parse_dockerfile(broken)
    assert ignored("tests/test_deploy.py") and ignored("libs/otc-common/src/otc_common/__pycache__/x.pyc")
    assert not ignored("libs/otc-common/src/otc_common/bus.py")


def test_setup_script_renders_a_registry_the_services_accept() -> None:
    text = docker_setup_script().render_registry(
        TEST_SEED_HEX,
        {"ETH": "http://anvil-eth:8545", "POLYGON": "http://anvil-polygon:8545"},
        {"ETH": FIRST_CONTRACT, "POLYGON": FIRST_CONTRACT},
        "tcp://devnet:50001",
    )
    registry = parse_registry(text, environ={})
    assert set(registry.chains) == {"ETH", "POLYGON", "UNICITY"}
    for chain in registry.chains.values():
        EscrowKeyring(chain.account_xpub, chain.derivation_path)  # the xpub sits at the path's account level
    assert registry.chain("UNICITY").kind is ChainKind.UTXO
    assert registry.chain("ETH").assets["USDT"].contract == FIRST_CONTRACT


@cache
def docker_setup_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("otc_docker_setup", DOCKER / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- docker compose ---------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return document


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    check = tool("check-jsonschema")
    result = run(check, "--builtin-schema", "vendor.compose-spec", str(REPO / "docker-compose.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator is not vacuous: an unknown service key fails it.
    broken = compose() | {"services": {**compose()["services"], "engine": {**compose()["services"]["engine"]}}}
    broken["services"]["engine"]["replica_count"] = 2
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    assert run(check, "--builtin-schema", "vendor.compose-spec", str(bad)).returncode != 0


BROKER_MODULES = {"otc_gateway", "otc_engine", "otc_queue", "otc_tank", "otc_watcher_evm", "otc_watcher_utxo"}


def compose_services_by_module() -> dict[str, list[str]]:
    """Compose service names per broker module they run (from the image's Dockerfile)."""
    found: dict[str, list[str]] = {}
    for name, service in compose()["services"].items():
        build = service.get("build")
        if not build:
            continue
        entry = json.loads(parse_dockerfile(REPO / build["dockerfile"]).final.all("ENTRYPOINT")[-1].args)
        if entry[:2] == ["python", "-m"] and entry[2] in BROKER_MODULES:
            found.setdefault(entry[2], []).append(name)
    return found


def test_compose_runs_every_service_and_one_watcher_per_chain() -> None:
    by_module = compose_services_by_module()
    assert set(by_module) == BROKER_MODULES
    chains = {
        compose()["services"][name]["command"][1]: module
        for module in ("otc_watcher_evm", "otc_watcher_utxo")
        for name in by_module[module]
    }
    assert chains == {"ETH": "otc_watcher_evm", "POLYGON": "otc_watcher_evm", "UNICITY": "otc_watcher_utxo"}
    images = {
        compose()["services"][name].get("image", "").split(":")[0] for names in by_module.values() for name in names
    }
    assert all(image for image in images), "each built service is tagged, so the dev overlay can use the image"
    # setup.py writes the chain ids of the dev stack's chains into the registry; the nodes must agree.
    for chain in DEV_CHAINS:
        command = compose()["services"][f"anvil-{chain.name.lower()}"]["command"]
        assert f"--chain-id={chain.chain_id}" in command, chain.name


def test_compose_mounts_the_seed_only_into_the_signers() -> None:
    seed_users = set()
    for name, service in compose()["services"].items():
        mounts = [str(volume).split(":")[0] for volume in service.get("volumes", [])]
        environment = service.get("environment", {})
        if "seed" in mounts or "OTC_SEED_FILE" in environment or "OTC_SEED" in environment:
            seed_users.add(name)
    assert seed_users == {"setup", "queue-processor", "tank"}


def test_compose_services_wait_for_what_they_need_and_report_health() -> None:
    services = compose()["services"]
    for module, names in compose_services_by_module().items():
        for name in names:
            service = services[name]
            assert service["depends_on"]["setup"]["condition"] == "service_completed_successfully", name
            assert service["depends_on"]["nats"]["condition"] == "service_healthy", name
            if module != "otc_gateway":
                assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
            assert "/readyz" in " ".join(service["healthcheck"]["test"]), name
            assert service.get("read_only") is True and service.get("cap_drop") == ["ALL"], name
    for infrastructure in ("nats", "postgres", "anvil-eth", "anvil-polygon", "devnet", "prometheus"):
        assert "healthcheck" in services[infrastructure], infrastructure


def test_prometheus_scrapes_every_broker_service_of_the_compose_stack() -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target.split(":")[0]: int(target.split(":")[1])
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    services = compose()["services"]
    for names in compose_services_by_module().values():
        for name in names:
            port = int(services[name].get("environment", {}).get("OTC_HTTP_PORT", 8081))
            assert targets.get(name) == port, f"{name}:{port} is not scraped"
    mounted = [v for v in services["prometheus"]["volumes"] if "alerts.yml" in v]
    assert mounted and mounted[0].split(":")[1].startswith("/etc/prometheus/rules/")
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]


# --- Kubernetes ---------------------------------------------------------------------------------


@cache
def rendered(directory: str) -> list[dict[str, Any]]:
    result = run(tool("kubectl"), "kustomize", str(K8S / directory))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def broker(deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return bool(labels.get("app.kubernetes.io/part-of") == "otc-broker")


def app_name(workload: dict[str, Any]) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS, ids=lambda v: v or "latest")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay: str, version: str | None, tmp_path: Path) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered(f"overlays/{overlay}")))
    argv = [tool("kubernetes-validate"), "--strict", "--quiet"]
    if version:
        argv += ["--kubernetes-version", version]
    result = run(*argv, str(manifest))
    # A kind without a bundled schema is only a WARN; the overlays must hold none (CRDs live in k8s/optional).
    assert result.returncode == 0 and "WARN" not in result.stdout, result.stdout + result.stderr


def test_the_kubernetes_validator_is_strict(tmp_path: Path) -> None:
    deployment = of_kind(rendered("overlays/dev"), "Deployment")[0]
    broken = json.loads(json.dumps(deployment))
    pod_spec(broken)["containers"][0]["livenessProbes"] = []
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump(broken))
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", str(manifest))
    assert result.returncode != 0, result.stdout


def secret_references(spec: dict[str, Any]) -> set[str]:
    names = set()
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    return names


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            yield doc
        if doc["kind"] == "CronJob":
            yield doc["spec"]["jobTemplate"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_seed_secret_is_mounted_only_into_queue_processor_and_tank(overlay: str) -> None:
    docs = rendered(f"overlays/{overlay}")
    seed_names = {doc["metadata"]["name"] for doc in of_kind(docs, "Secret")}
    seed_names = {name for name in seed_names if name.startswith("otc-seed")} or {"otc-seed"}
    holders = {}
    for workload in workloads(docs):
        spec = pod_spec(workload)
        refs = secret_references(spec) & seed_names
        env = {e["name"] for c in spec["containers"] for e in c.get("env", [])}
        if refs or env & {"OTC_SEED", "OTC_SEED_FILE"}:
            holders[app_name(workload)] = (workload, refs)
    assert set(holders) == SIGNERS
    for workload, refs in holders.values():
        spec = pod_spec(workload)
        (volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") in refs]
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount.get("readOnly") is True
        seed_file = {e["name"]: e.get("value") for e in container["env"]}["OTC_SEED_FILE"]
        (item,) = volume["secret"]["items"]
        assert seed_file == f"{mount['mountPath']}/{item['path']}", "OTC_SEED_FILE names the mounted file"
        assert volume["secret"]["defaultMode"] & 0o007 == 0, "the seed file is not world-readable"
        assert workload["spec"].get("replicas", 1) == 1 and workload["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_probes_resources_and_a_locked_down_security_context(overlay: str) -> None:
    grace = ConsumerSpec(durable="x", stream="x", filter_subjects=[]).ack_wait_seconds + default_drain_seconds()
    deployments = of_kind(rendered(f"overlays/{overlay}"), "Deployment")
    assert deployments
    for workload in [*deployments, *of_kind(rendered(f"overlays/{overlay}"), "Job")]:
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name
            if workload["kind"] == "Deployment":
                assert "livenessProbe" in container and "readinessProbe" in container, name
        if workload["kind"] == "Deployment" and broker(workload):
            (container,) = spec["containers"]
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            assert spec["terminationGracePeriodSeconds"] >= grace, name


def default_drain_seconds() -> int:
    (drain,) = [f.default for f in msgspec.structs.fields(BaseSettings) if f.name == "drain_seconds"]
    return int(drain)


def selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(key) == value for key, value in wanted.items())


NATS_POD = {"app.kubernetes.io/name": "nats", "app.kubernetes.io/component": "nats"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_only_what_each_service_needs(overlay: str) -> None:
    docs = rendered(f"overlays/{overlay}")
    policies = of_kind(docs, "NetworkPolicy")
    names = {p["metadata"]["name"] for p in policies}
    assert {"default-deny", "allow-dns", "nats"} <= names
    for deployment in filter(broker, of_kind(docs, "Deployment")):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        own = [p for p in policies if p["spec"]["podSelector"] and selects(p, labels)]
        assert len(own) == 1, f"{deployment['metadata']['name']}: {[p['metadata']['name'] for p in own]}"
        spec = own[0]["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        egress_ports = {port["port"] for rule in spec["egress"] for port in rule.get("ports", [])}
        for rule in spec["egress"]:
            for peer in rule.get("to", []):
                # A kustomize label transformer must not have rewritten the selector of the NATS pods.
                assert peer.get("podSelector", {}).get("matchLabels") == NATS_POD, own[0]["metadata"]["name"]
        assert 4222 in egress_ports
        name = app_name(deployment)
        if name == "rpc-gateway":
            assert egress_ports == {4222}, "the gateway talks only to NATS"
            assert [p["port"] for r in spec["ingress"] for p in r["ports"]] == [8080]
        else:
            assert 5432 in egress_ports
            metrics_from = [peer for rule in spec["ingress"] for peer in rule["from"]]
            assert metrics_from == [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ]
        chain_ports = egress_ports - {4222, 5432}
        if name in SIGNERS or name == "chain-watcher":
            assert chain_ports and chain_ports <= {443, 8545, 50001, 50002}, name
        else:
            assert not chain_ports, f"{name} has no business with a chain node"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_autoscales_and_keeps_a_disruption_budget(overlay: str) -> None:
    docs = rendered(f"overlays/{overlay}")
    (gateway,) = [d for d in of_kind(docs, "Deployment") if app_name(d) == "rpc-gateway"]
    assert "replicas" not in gateway["spec"], "the autoscaler owns the gateway's replica count"
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= gateway["spec"]["selector"]["matchLabels"].items()


def overlay_registry_text(docs: list[dict[str, Any]]) -> str:
    (config_map,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("otc-registry")]
    return str(config_map["data"]["registry.toml"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_watcher_deployment_per_registry_chain_with_its_own_selector(overlay: str) -> None:
    docs = rendered(f"overlays/{overlay}")
    chains = tomllib.loads(overlay_registry_text(docs))["chains"]
    watchers = [d for d in of_kind(docs, "Deployment") if app_name(d) == "chain-watcher"]
    by_chain = {}
    for watcher in watchers:
        (container,) = pod_spec(watcher)["containers"]
        args = container["args"]
        assert args[0] == "--chain"
        by_chain[args[1]] = watcher
        assert watcher["spec"]["selector"]["matchLabels"]["otc.io/chain"] == args[1]
        image = container["image"].rsplit("/", 1)[-1].split(":")[0]
        assert image == f"otc-watcher-{chains[args[1]]['kind']}"
    assert set(by_chain) == set(chains)
    selectors = [json.dumps(w["spec"]["selector"], sort_keys=True) for w in watchers]
    assert len(set(selectors)) == len(selectors), "watchers of different chains must not select each other's pods"


def test_dev_overlay_registry_is_what_the_setup_script_renders_for_its_chains() -> None:
    docs = rendered("overlays/dev")
    text = overlay_registry_text(docs)
    services = {d["metadata"]["name"]: d for d in of_kind(docs, "Service")}
    expected = docker_setup_script().render_registry(
        TEST_SEED_HEX,
        {name: f"http://anvil-{name.lower()}:8545" for name in ("ETH", "POLYGON")},
        {"ETH": FIRST_CONTRACT, "POLYGON": FIRST_CONTRACT},
        "tcp://unicity-devnet:50001",
    )
    assert tomllib.loads(text) == tomllib.loads(expected)
    parse_registry(text, environ={})
    for host in ("anvil-eth", "anvil-polygon", "unicity-devnet"):
        assert host in services, f"the registry names {host}, which the overlay does not run"
    for chain in DEV_CHAINS:
        (anvil,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == f"anvil-{chain.name.lower()}"]
        assert f"--chain-id={chain.chain_id}" in pod_spec(anvil)["containers"][0]["args"], chain.name
    (job,) = of_kind(docs, "Job")
    assert f"--expect-token={FIRST_CONTRACT}" in pod_spec(job)["containers"][0]["args"]


def test_prod_registry_is_valid_once_its_placeholders_are_filled() -> None:
    text = overlay_registry_text(rendered("overlays/prod"))
    dev = parse_registry(overlay_registry_text(rendered("overlays/dev")), environ={})

    def placeholders(document: str) -> dict[tuple[str, str], str]:
        chains = tomllib.loads(document)["chains"]
        return {(c, k): v for c, f in chains.items() for k, v in f.items() if isinstance(v, str) and "REPLACE" in v}

    found = placeholders(text)
    fields = {key for _, key in found}
    # Keys and addresses come from the operator, never from the repository.
    assert {"account_xpub", "operator_address", "tank_address"} <= fields
    for (chain_id, key), value in found.items():
        kind = tomllib.loads(text)["chains"][chain_id]["kind"]
        sample = next(c for c in dev.chains.values() if c.kind.value == kind)
        fill = {
            "operator_address": sample.operator_address,
            "tank_address": sample.tank_address,
            "account_xpub": sample.account_xpub,
            "rpc": "https://node.example",
            "electrum": "ssl://node.example:50002",
        }[key]
        text = text.replace(f'{key} = "{value}"', f'{key} = "{fill}"', 1)
    assert not placeholders(text)
    registry = parse_registry(text, environ={})
    assert {c.kind for c in registry.chains.values()} == {ChainKind.EVM, ChainKind.UTXO}


@pytest.mark.parametrize("directory", OPTIONAL)
def test_optional_manifests_render_and_hold_what_the_overlays_cannot_validate(directory: str, tmp_path: Path) -> None:
    docs = rendered(f"optional/{directory}")
    crds = [d for d in docs if not d["apiVersion"].startswith(("v1", "apps/", "networking.k8s.io/"))]
    assert crds, "only CRD-based manifests belong in k8s/optional"
    assert {d["kind"] for d in crds} <= {"Cluster", "PodMonitor", "ServiceMonitor", "PrometheusRule"}
    plain = [d for d in docs if d not in crds]
    if plain:
        manifest = tmp_path / "plain.yaml"
        manifest.write_text(yaml.safe_dump_all(plain))
        result = run(tool("kubernetes-validate"), "--strict", "--quiet", str(manifest))
        assert result.returncode == 0 and "WARN" not in result.stdout, result.stdout + result.stderr


def test_nats_values_describe_a_three_node_jetstream_cluster_on_file_storage() -> None:
    values = yaml.safe_load((K8S / "nats" / "values.yaml").read_text())
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    jetstream = values["config"]["jetstream"]
    assert jetstream["enabled"] is True
    assert jetstream["fileStore"]["enabled"] is True and jetstream["fileStore"]["pvc"]["enabled"] is True
    assert jetstream["memoryStore"]["enabled"] is False
    for overlay in OVERLAYS:
        config = of_kind(rendered(f"overlays/{overlay}"), "ConfigMap")
        (env,) = [c for c in config if c["metadata"]["name"].startswith("otc-config")]
        assert env["data"]["OTC_NATS_URL"] == "nats://nats:4222", "the chart's service for release `nats`"


# --- alert rules and dashboard -------------------------------------------------------------------


@cache
def exported_metrics() -> set[str]:
    """Metric names the services declare (prometheus_client Counter/Gauge/Histogram/Summary)."""
    pattern = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")
    names = set()
    for path in [*REPO.glob("libs/*/src/**/*.py"), *REPO.glob("services/*/src/**/*.py")]:
        names.update(pattern.findall(path.read_text(encoding="utf-8")))
    return names


def metric_names(expr: str) -> set[str]:
    names = set()
    for name in re.findall(r"\b(otc_[a-z0-9_]+)\b", expr):
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        names.add(base if base in exported_metrics() or base in PENDING_METRICS else name)
    return names


@cache
def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_are_complete_and_well_formed() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    required = {"OtcTankLowBalance", "OtcPayoutStuck", "OtcDeepReorgHalt", "OtcConsumerStalled", "OtcSolvencyMismatch"}
    assert required <= set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]


def test_alert_rules_and_dashboard_use_exported_or_announced_metrics() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "otc-broker.json").read_text())
    expressions = [rule["expr"] for rule in alert_rules()]
    expressions += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*(metric_names(expr) for expr in expressions))
    unknown = used - exported_metrics() - set(PENDING_METRICS)
    assert not unknown, f"not exported by any service: {sorted(unknown)}"
    # Still announced as pending though a service now exports it: move it out of PENDING_METRICS.
    assert not (set(PENDING_METRICS) & exported_metrics())
    assert {"otc_tank_balance_wei", "otc_chain_halted", "otc_consumer_redeliveries_total"} <= used


def test_prometheus_rule_for_the_operator_matches_the_rule_file() -> None:
    rule = yaml.safe_load((K8S / "optional" / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())


def test_grafana_dashboard_is_provisioned_and_covers_the_system() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "otc-broker.json").read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("stage", "broadcast", "confirmed", "tank", "reorg", "lag", "redeliver", "rpc errors"):
        assert topic in titles, topic
    provider = yaml.safe_load(
        (REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "otc-broker.yml").read_text()
    )
    mounts = compose()["services"]["grafana"]["volumes"]
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts


# --- README -------------------------------------------------------------------------------------

SERVICE_SETTINGS = {
    "rpc-gateway": "otc_gateway.settings:GatewaySettings",
    "engine": "otc_engine.settings:EngineSettings",
    "queue-processor": "otc_queue.settings:QueueSettings",
    "tank": "otc_tank.settings:TankSettings",
    "chain-watcher-evm": "otc_watcher_evm.settings:WatcherSettings",
    "chain-watcher-utxo": "otc_watcher_utxo.settings:WatcherSettings",
}
#: Read besides the settings classes: the signers' seed, and the tank's per-chain thresholds.
EXTRA_VARIABLES = {
    "queue-processor": {"OTC_SEED", "OTC_SEED_FILE"},
    "tank": {"OTC_SEED", "OTC_SEED_FILE", "OTC_TANK_LOW_BALANCE_<CHAIN>"},
}
EVERY_SERVICE = "Every service"


def readme_settings() -> dict[str, dict[str, str]]:
    """README's configuration tables: section title -> variable -> its default cell."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    text = text[text.index("## Configuration\n") : text.index("### The registry\n")]
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = sections.setdefault(line[4:].strip(), {})
        elif line.startswith("| `OTC_") and current is not None:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            for variable in re.findall(r"`(OTC_[A-Z0-9_<>]+)`", cells[0]):
                current[variable] = cells[-1]
    return sections


def shown(default: Any) -> str:
    """A default as the README writes it."""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def test_readme_documents_every_setting_of_every_service_with_its_default() -> None:
    sections = readme_settings()
    common = sections[EVERY_SERVICE]
    base = {f.name: f for f in msgspec.structs.fields(BaseSettings)}
    assert set(common) == {env_name(name) for name in base}
    for service, target in SERVICE_SETTINGS.items():
        module, _, name = target.partition(":")
        fields = msgspec.structs.fields(getattr(importlib.import_module(module), name))
        own = sections.get(service, {})
        for f in fields:
            variable = env_name(f.name)
            if f.name in base:
                cell = common[variable]
                if f.default == base[f.name].default:
                    assert cell.startswith("required" if f.required else f"`{shown(f.default)}`"), (variable, cell)
                else:
                    # A service with its own default is named in the shared row, with that default.
                    assert service in cell and (f.default == "" or f"`{shown(f.default)}`" in cell), (variable, cell)
                continue
            assert variable in own, f"README: {variable} of {service} is not documented"
            cell = own[variable]
            if f.required:
                assert cell.startswith("required"), (service, variable, cell)
            elif f.default == "":
                assert cell.startswith("empty"), (service, variable, cell)
            else:
                assert cell.startswith(f"`{shown(f.default)}`"), (service, variable, cell)
        known = {env_name(f.name) for f in fields} | EXTRA_VARIABLES.get(service, set())
        assert set(own) <= known, f"README documents what {service} does not read: {sorted(set(own) - known)}"
    assert set(sections) == {EVERY_SERVICE, *SERVICE_SETTINGS}, "one table per service"
