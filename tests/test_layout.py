"""The architecture rules of docs/architecture.md, checked on the real tree.

* the signer never imports the gateway;
* the shared plumbing (``signer/common/``) and the signer's public client side
  (``signer/client.py``, ``signer/encoding.py``, ``signer/config.py``, ``signer/v1/``)
  import neither the
  gateway nor ``pkcs11``, so a gateway-only install works without python-pkcs11;
* the generated Signer API code is what ``protos/generate.py`` produces today.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIGNER = ROOT / "signer"

# What a gateway-only host imports and runs.
GATEWAY_SIDE_MODULES = (
    "gateway.app",
    "gateway.server",
    "gateway.router",
    "gateway.client",
    "gateway.bench",
    "gateway.cli",
    "signer.client",
)
SUBCOMMANDS = ("bench", "demo", "gateway", "keys", "ping", "signer", "test-keyserver")
NEED_SIGNER_EXTRA = "python-pkcs11 is not installed: install keyward[signer] on signer hosts"
BLOCK_PKCS11 = "import sys\nsys.modules['pkcs11'] = None  # `import pkcs11` raises ImportError\n"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (also inside functions), with
    relative imports resolved to absolute names."""
    return scan_imports(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def scan_imports(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """The modules ``source`` imports, as if it were the module named ``module``."""
    tree = ast.parse(source)
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            found.add(prefix)
            # ``from gateway import router`` imports the module gateway.router.
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                found.add(first.value)
    return found


def offending_names(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in names if name.split(".")[0] in forbidden)


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in paths
        for name in offending_names(imported_modules(path), forbidden)
    ]


def python_files(*roots: Path) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        files.extend([root] if root.is_file() else sorted(root.rglob("*.py")))
    return files


# -- the checker itself sees what it must -----------------------------------------------


def test_the_import_scanner_finds_every_form_of_import() -> None:
    source = (
        "import gateway.app\n"
        "from gateway import router\n"
        "def f():\n"
        "    import pkcs11\n"
        "    from ..hsm import pool\n"
        "    from . import tls\n"
        "    __import__('gateway.demo')\n"
        "    importlib.import_module('pkcs11.constants')\n"
    )
    names = scan_imports(source, "signer.common.probe")
    assert {"gateway.app", "gateway.router", "pkcs11", "signer.hsm", "signer.hsm.pool",
            "signer.common.tls", "gateway.demo", "pkcs11.constants"} <= names
    assert offending_names(names, ("gateway", "pkcs11")) == sorted(
        ["gateway", "gateway.app", "gateway.demo", "gateway.router", "pkcs11",
         "pkcs11.constants"])


# -- (a) the signer never imports the gateway ----------------------------------------


def test_there_is_something_to_check() -> None:
    files = python_files(SIGNER)
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"signer/service.py", "signer/common/cli.py", "signer/hsm/pool.py",
            "signer/client.py", "signer/v1/signer_pb2_grpc.py"} <= names


def test_no_signer_module_imports_the_gateway() -> None:
    assert offending(python_files(SIGNER), ("gateway",)) == []


# -- (b) the shared plumbing and the client side stay free of pkcs11 -------------------


def test_shared_plumbing_and_client_side_import_neither_pkcs11_nor_gateway() -> None:
    files = python_files(
        SIGNER / "common", SIGNER / "client.py", SIGNER / "encoding.py", SIGNER / "config.py",
        SIGNER / "v1", SIGNER / "__init__.py",
    )
    assert len(files) >= 10
    assert offending(files, ("pkcs11", "gateway")) == []


def test_shared_plumbing_does_not_reach_into_the_signer_service() -> None:
    # signer.hsm, signer.service and signer.server need pkcs11; reaching them from the
    # shared plumbing or the client side would pull it in indirectly.
    files = python_files(SIGNER / "common", SIGNER / "client.py", SIGNER / "encoding.py",
                         SIGNER / "config.py", SIGNER / "v1")
    service = []
    for path in files:
        for name in imported_modules(path):
            if name.split(".")[:2] in (["signer", "hsm"], ["signer", "service"],
                                       ["signer", "server"], ["signer", "cli"]):
                service.append(f"{path.relative_to(ROOT)} imports {name}")
    assert service == []


# -- (c) a gateway-only install: no python-pkcs11 --------------------------------------


@pytest.fixture(scope="module")
def no_pkcs11(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a Python where ``import pkcs11`` fails, as on a host without
    the ``signer`` extra: a sitecustomize on PYTHONPATH blocks the module before any
    other import runs."""
    site = tmp_path_factory.mktemp("no-pkcs11")
    (site / "sitecustomize.py").write_text(BLOCK_PKCS11)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    return env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          env=env, cwd=ROOT)


def test_pkcs11_is_really_blocked(no_pkcs11: dict[str, str]) -> None:
    proc = _run([sys.executable, "-c", "import pkcs11"], no_pkcs11)
    assert proc.returncode == 1
    assert "ModuleNotFoundError: import of pkcs11 halted" in proc.stderr


def test_gateway_side_imports_without_pkcs11(no_pkcs11: dict[str, str]) -> None:
    code = (
        "import sys\n"
        f"for name in {GATEWAY_SIDE_MODULES!r}:\n"
        "    __import__(name)\n"
        "loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and (\n"
        "    m.split('.')[0] == 'pkcs11'\n"
        "    or m.startswith(('signer.hsm', 'signer.service', 'signer.server'))))\n"
        "print('loaded:', loaded)\n"
    )
    proc = _run([sys.executable, "-c", code], no_pkcs11)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded: []"


def test_keyward_help_lists_every_subcommand_without_pkcs11(no_pkcs11: dict[str, str]) -> None:
    proc = _run([sys.executable, "-m", "signer.common.cli", "--help"], no_pkcs11)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines()
              if line.startswith("    ") and line.split()}
    assert set(SUBCOMMANDS) <= listed, proc.stdout


def _console_script() -> Path:
    script = Path(sys.executable).parent / "keyward"
    if not script.exists():
        pytest.skip("the keyward console script is not installed next to this interpreter")
    return script


INVOCATIONS = {
    "python-m": lambda: [sys.executable, "-m", "signer.common.cli"],
    "console-script": lambda: [str(_console_script())],
}
SIGNER_COMMANDS = {
    "signer": ("signer", "--insecure", "--pkcs11-uri", "pkcs11:token=t"),
    "keys-list": ("keys", "list", "--pkcs11-uri", "pkcs11:token=t"),
    "keys-generate": ("keys", "generate", "--type", "p256", "--label", "k",
                      "--pkcs11-uri", "pkcs11:token=t"),
    "keys-import": ("keys", "import", "--pem", __file__, "--label", "k",
                    "--pkcs11-uri", "pkcs11:token=t"),
}


@pytest.mark.parametrize(
    ("form", "args"),
    [
        pytest.param(form, args, id=f"{name}-{form}")
        for form in INVOCATIONS
        for name, args in SIGNER_COMMANDS.items()
    ],
)
def test_signer_commands_without_pkcs11_say_what_to_install(
    no_pkcs11: dict[str, str], form: str, args: tuple[str, ...]
) -> None:
    proc = _run([*INVOCATIONS[form](), *args], no_pkcs11)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"keyward {args[0]}: {NEED_SIGNER_EXTRA}"


# -- (d) generated code is current ------------------------------------------------------


def test_generated_signer_api_code_is_current() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    proc = _run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout
