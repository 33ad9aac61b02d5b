"""The package's shape: one import root, nothing that shadows another distribution, imports that
flow one way, and an SDK that installs and runs without the server's dependencies."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tandem"
# Imports flow from the API down (docs/design.md): a module may import its own layer and those below.
LAYERS = {"cluster": 4, "actors": 3, "spec": 2, "engine": 1, "kernels": 0}
LIGHT = ("tandem", "tandem.client", "tandem.cli", "tandem.params", "tandem.errors", "tandem.models", "tandem.protos", "tandem.logs")
HEAVY = ("torch", "ray", "pydantic", "transformers", "numpy", "fastapi")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tandem_imports(path: Path) -> set[str]:
    """Every tandem module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tandem")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tandem"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from tandem import zoo`
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): tandem_imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_imports_flow_from_the_api_down_to_the_kernels():
    def layer(m: str) -> int | None:
        parts = m.split(".")
        return LAYERS.get(parts[1]) if len(parts) > 1 else None

    upward = [f"{m} imports {n}" for m, deps in import_graph().items() for n in deps
              if layer(m) is not None and layer(n) is not None and layer(n) > layer(m)]
    assert not upward, upward
    light = {m: deps for m, deps in import_graph().items() if m in LIGHT and m != "tandem.cli"}
    assert all(layer(n) is None for deps in light.values() for n in deps), light


def test_nothing_under_the_repo_root_shadows_an_installed_package():
    """Run from the repo root (as the README's commands are), `import kernels` must find Hugging
    Face's kernels (transformers needs it) or nothing, never a folder of this repo."""
    roots = [p.name for p in REPO.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()]
    assert roots == ["tandem"], roots
    for name in ("kernels", "cluster", "actors", "protos", "models", "tests", "benchmarks", "deploy", "docs"):
        code = (f"import importlib.util as u; s = u.find_spec({name!r}); "
                "print(s.origin if s and s.origin else list(s.submodule_search_locations or []) if s else '')")
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
        # a namespace folder found on sys.path[0] only (no package of that name installed) is not a shadow
        origin = out.strip()
        if origin and not origin.startswith("[") and "site-packages" not in origin:  # (a venv may sit in the repo)
            assert not origin.startswith(str(REPO)), f"import {name} from the repo root finds {origin}"


BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {heavy!r}:
                raise ImportError(f"No module named {{name!r}} (blocked)", name=name)
    sys.meta_path.insert(0, Block())
""")


def run_light(code: str) -> subprocess.CompletedProcess:
    script = BLOCK.format(heavy=HEAVY) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_sdk_imports_without_torch_ray_or_pydantic():
    run = run_light(f"""
        import importlib
        for m in {LIGHT!r} + ("tandem.protos.tandem_pb2_grpc",):
            importlib.import_module(m)
        from tandem.client import TandemClient
        TandemClient("127.0.0.1:1").close()
        print("ok")
    """)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_cli_without_the_server_extra_says_what_to_install():
    run = run_light("""
        import sys
        from tandem.cli import main
        sys.exit(main(["generate", "--prompt", "def f():"]))
    """)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "pip install 'tandem[server]'" in lines[0] and "torch" in lines[0]
    zoo = run_light("import sys; from tandem.cli import main; sys.exit(main(['zoo', '--help']))")
    assert zoo.returncode == 2 and "tandem[server]" in zoo.stderr and len(zoo.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package_with_the_tiny_pair(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("tandem-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"tandem"}
    for f in ("tandem/models/tiny/target/model.safetensors", "tandem/models/tiny/draft/tokenizer.json",
              "tandem/protos/tandem.proto", "tandem/protos/tandem_pb2_grpc.py"):
        assert f in names, f
