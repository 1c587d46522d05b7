"""The core is host-free: outside hosts/ (the adapters) it imports only the standard library, torch
and safetensors, never a WebUI module; and the product package holds no demo or research code."""
import ast
import pathlib
import sys

CORE = pathlib.Path(__file__).resolve().parents[1] / "lib_autolora"
ALLOWED = {"torch", "safetensors"} | set(sys.stdlib_module_names) | {"__future__"}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_core_imports_nothing_from_the_webui():
    files = [p for p in CORE.rglob("*.py") if "hosts" not in p.relative_to(CORE).parts]
    assert len(files) >= 8
    bad = {f"{p.relative_to(CORE)}: {name}" for p in files for name in _imports(p) if name not in ALLOWED}
    assert not bad, bad


def test_the_product_package_has_no_demo_research_or_weights():
    parts = {part for p in CORE.rglob("*") for part in p.relative_to(CORE).parts}
    assert not {"demo", "research", "assets"} & parts
    assert not list(CORE.rglob("*.safetensors"))
