"""The dependency direction of the packages (docs/design.md, "Where things live"), checked on the source.

Leaves (`fedbpt_wire`, `fedbpt_assets`) import no other package of this repository; the roles import only the
leaves, never each other; `fedbpt` (the command line, demo, bench grid) sits on top. A client installs no
torch, so nothing a client imports at module level may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {
    "fedbpt_wire",
    "fedbpt_assets",
    "inference_service",
    "fed_clients",
    "aggregator",
    "fedbpt",
    "fedbpt_flower",
    "bench",
}
LEAVES = {"fedbpt_wire", "fedbpt_assets"}
ALLOWED = {
    "fedbpt_wire": set(),
    "fedbpt_assets": set(),
    "inference_service": LEAVES,
    "fed_clients": LEAVES,
    "aggregator": LEAVES,
    # The Flower app reuses the strategies and the client's round: both roles, nothing above them.
    "fedbpt_flower": LEAVES | {"aggregator", "fed_clients"},
    "fedbpt": OURS - {"fedbpt", "bench"},
}


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute module names `path` imports (every import, or only those run when the module loads)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_runs_upward(package):
    if not (ROOT / package).is_dir():
        pytest.skip(f"{package} is not in this checkout")
    wrong = {}
    for path in modules(package):
        bad = {m for m in imports(path) if m.split(".")[0] in OURS - ALLOWED[package] - {package}}
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])} of this repository: {wrong}"


@pytest.mark.parametrize("package", ["fed_clients", "fedbpt_wire", "aggregator"])
def test_roles_without_a_model_load_no_torch(package):
    heavy = {"torch", "transformers", "vllm"}
    loaded = {
        str(p.relative_to(ROOT)): sorted(m for m in imports(p, top_level_only=True) if m.split(".")[0] in heavy)
        for p in modules(package)
    }
    assert not {k: v for k, v in loaded.items() if v}, "a client or aggregator install has no torch"


def test_the_check_sees_an_upward_import(tmp_path):
    # The checker itself: a module that imports the CLI side from a role is found.
    module = tmp_path / "m.py"
    module.write_text("import json\nfrom fedbpt.cli import main\n\ndef f():\n    import fedbpt_wire.schemas\n")
    assert imports(module) == {"json", "fedbpt.cli", "fedbpt_wire.schemas"}
    assert imports(module, top_level_only=True) == {"json", "fedbpt.cli"}
