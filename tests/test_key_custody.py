"""Key custody (DESIGN §4): only the signers may reach the seed.

The engine, the watchers and the gateway derive escrow addresses from extended public keys; only the
queue processor and the tank hold the seed. This test reads every package's source with `ast` and
fails if any other package imports `otc_common.signing_keys`, in any spelling.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIGNING_MODULE = "otc_common.signing_keys"
COMMON_DIR = REPO / "libs" / "otc-common" / "src" / "otc_common"

# Packages allowed to import the signing module, and why.
ALLOWED_PACKAGES: dict[str, str] = {
    "otc_queue": "signs payout transactions from escrows",
    "otc_tank": "signs gas-funding transactions from the tank wallets",
    # The one exception beyond the two signing services: the developer CLI holds the *dev* seed so
    # that it can write the dev registry's account xpubs; it never runs in production.
    "otc_cli": "dev CLI: derives the dev registry's account xpubs from the dev seed",
}
# Inside otc_common, only the signing module itself may touch it (it does not import itself).
ALLOWED_COMMON_MODULES = frozenset({SIGNING_MODULE})


@dataclass(frozen=True)
class SourceFile:
    path: Path
    package: str
    module: str
    is_package: bool


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    module: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {SIGNING_MODULE}"


def _is_signing(name: str) -> bool:
    return name == SIGNING_MODULE or name.startswith(SIGNING_MODULE + ".")


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    # A package's __init__ is its own base for `from .`; a plain module's base is its parent.
    base = parts if is_package else parts[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


_DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__"})


def signing_import_lines(source: str, module: str, is_package: bool = False) -> list[int]:
    """Line numbers at which `source` (the text of `module`) imports the signing module."""
    hits: list[int] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            if any(_is_signing(alias.name) for alias in node.names):
                hits.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(node, module, is_package)
            if _is_signing(target) or (
                target == "otc_common" and any(alias.name == "signing_keys" for alias in node.names)
            ):
                hits.append(node.lineno)
        elif isinstance(node, ast.Attribute):
            # `import otc_common` followed by `otc_common.signing_keys.…` works once anyone imported it.
            if node.attr == "signing_keys" and isinstance(node.value, ast.Name) and node.value.id == "otc_common":
                hits.append(node.lineno)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in _DYNAMIC_IMPORTERS and any(
                isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.endswith("signing_keys")
                for arg in node.args
            ):
                hits.append(node.lineno)
    return sorted(set(hits))


def allowed(package: str, module: str) -> bool:
    if package == "otc_common":
        return module in ALLOWED_COMMON_MODULES
    return package in ALLOWED_PACKAGES


def source_files(root: Path) -> list[SourceFile]:
    """Every Python file of every package under root/services/*/src and root/libs/*/src."""
    files: list[SourceFile] = []
    for src in sorted([*root.glob("services/*/src"), *root.glob("libs/*/src")]):
        for path in sorted(src.rglob("*.py")):
            relative = path.relative_to(src)
            if "__pycache__" in relative.parts:
                continue
            is_package = path.name == "__init__.py"
            parts = relative.parts[:-1] if is_package else (*relative.parts[:-1], path.stem)
            files.append(SourceFile(path, relative.parts[0], ".".join(parts), is_package))
    return files


def violations(root: Path) -> list[Violation]:
    found: list[Violation] = []
    for file in source_files(root):
        if allowed(file.package, file.module):
            continue
        source = file.path.read_text(encoding="utf-8")
        for line in signing_import_lines(source, file.module, file.is_package):
            found.append(Violation(str(file.path.relative_to(root)), line, file.module))
    return found


# --- the checker checks itself ---------------------------------------------------------------------

IMPORT_FORMS = [
    "import otc_common.signing_keys",
    "import otc_common.signing_keys as sk",
    "import os, otc_common.signing_keys",
    "from otc_common import signing_keys",
    "from otc_common import money, signing_keys as sk",
    "from otc_common.signing_keys import load_seed",
    "from otc_common.signing_keys import (\n    load_seed,\n    escrow_private_key,\n)",
    "def f():\n    from otc_common.signing_keys import private_key_at\n    return private_key_at",
    "try:\n    import otc_common.signing_keys\nexcept ImportError:\n    pass",
    "import otc_common\nseed = otc_common.signing_keys.load_seed('')",
    "import importlib\nimportlib.import_module('otc_common.signing_keys')",
    "__import__('otc_common.signing_keys')",
]


@pytest.mark.parametrize("source", IMPORT_FORMS)
def test_checker_sees_every_import_form(source: str) -> None:
    assert signing_import_lines(source, "otc_engine.handlers")


@pytest.mark.parametrize(
    ("source", "module", "is_package"),
    [
        ("from . import signing_keys", "otc_common.registry", False),
        ("from .signing_keys import load_seed", "otc_common.registry", False),
        ("from .. import signing_keys", "otc_common.sub.thing", False),
        ("from ..signing_keys import Seed", "otc_common.sub.thing", False),
        ("from .signing_keys import Seed", "otc_common", True),
    ],
)
def test_checker_resolves_relative_imports(source: str, module: str, is_package: bool) -> None:
    assert signing_import_lines(source, module, is_package)


@pytest.mark.parametrize(
    "source",
    [
        "from otc_common import keys, money",
        "from otc_common.keys import EscrowKeyring",
        "import otc_common.keys",
        "import otc_common.signing_keys_docs",
        "from otc_common.signing_keys_docs import x",
        "from otc_engine import signing_keys",
        "from . import signing_keys",  # relative to otc_engine, not otc_common
        '"""Unlike otc_common.signing_keys, this module holds no secrets."""',
        "# import otc_common.signing_keys",
        "x = 'otc_common.signing_keys'",
    ],
)
def test_checker_ignores_lookalikes(source: str) -> None:
    assert signing_import_lines(source, "otc_engine.handlers") == []


def test_checker_fails_for_the_engine_and_passes_for_the_custodians(tmp_path: Path) -> None:
    def write(relative: str, text: str) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    bad = "from otc_common.signing_keys import load_seed\n"
    write("services/engine/src/otc_engine/__init__.py", "")
    write("services/engine/src/otc_engine/rules.py", "import os\n\n" + bad)
    write("services/queue-processor/src/otc_queue/signer.py", bad)
    write("services/tank/src/otc_tank/wallet.py", bad)
    write("libs/otc-cli/src/otc_cli/dev.py", bad)
    write("libs/otc-common/src/otc_common/signing_keys.py", "import hmac\n")
    write("libs/otc-common/src/otc_common/keys.py", "from .signing_keys import Seed\n")
    write("services/rpc-gateway/src/otc_gateway/sub/__init__.py", "from .. import signing_keys\n")

    found = {(v.module, v.line) for v in violations(tmp_path)}
    assert found == {("otc_engine.rules", 3), ("otc_common.keys", 1)}


# --- the real tree ---------------------------------------------------------------------------------


def test_only_the_signers_import_signing_keys() -> None:
    files = source_files(REPO)
    packages = {file.package for file in files}
    # Guard against a vacuous pass: the walk must see the shared library and every service.
    assert {"otc_common", "otc_engine", "otc_queue", "otc_tank", "otc_gateway"} <= packages
    assert any(file.module == "otc_common.keys" for file in files)
    assert any(file.module == SIGNING_MODULE for file in files)
    found = violations(REPO)
    assert not found, "private key material must stay with the signers:\n" + "\n".join(map(str, found))


def test_keys_module_never_imports_signing_keys() -> None:
    source = (COMMON_DIR / "keys.py").read_text(encoding="utf-8")
    assert signing_import_lines(source, "otc_common.keys") == []
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("otc_common")
    }
    # What keys.py does import from otc_common must not reach the seed either.
    for module in imported:
        path = COMMON_DIR / (module.removeprefix("otc_common.").replace(".", "/") + ".py")
        assert signing_import_lines(path.read_text(encoding="utf-8"), module) == [], module


def test_signing_keys_never_logs_or_prints() -> None:
    tree = ast.parse((COMMON_DIR / "signing_keys.py").read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"logging", "structlog", "loguru", "warnings", "traceback"}
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "print" not in calls
