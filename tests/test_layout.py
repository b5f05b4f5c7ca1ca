"""The package layout: no import circles, nothing imports upwards (cli -> evaluate/trainer -> pipeline, cli ->
synthetic -> pipeline), and the CLI starts without torch. Imports inside functions count too: a lazy import is still a
dependency, and so is code named by a string (a backend spec, a stage's ``run:``)."""
import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"clips4": "clips4", "clips4.pipeline": "pipeline", "clips4.trainer": "trainer",
            "clips4.evaluate": "evaluate", "clips4.cli": "cli", "clips4.data": "data", "clips4.synthetic": "synthetic"}
#: layer of each top-level package; a package may import its own layer's siblings only where listed
ALLOWED = {
    "clips4.pipeline": {"clips4.pipeline", "clips4.data"},
    "clips4.trainer": {"clips4.trainer", "clips4.pipeline", "clips4.data"},
    "clips4.evaluate": {"clips4.evaluate", "clips4.trainer", "clips4.pipeline", "clips4.data"},
    "clips4.cli": {"clips4.cli", "clips4.evaluate", "clips4.trainer", "clips4.pipeline", "clips4.synthetic",
                   "clips4.data"},
    "clips4.data": {"clips4.data"},
    # the synthetic world and its teacher: a test world that sits above the pipeline (the pipeline reaches the
    # teacher only through a configured backend string, see BY_NAME_ACROSS_LAYERS)
    "clips4.synthetic": {"clips4.synthetic", "clips4.pipeline", "clips4.data"},
    "clips4": {"clips4.evaluate"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in (REPO / folder).rglob("*.py"):
            rel = f.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(path: Path, name: str, modules) -> set[str]:
    """clips4 modules that ``name`` imports (``from pkg import sub`` names the submodule, not ``pkg``)."""
    tree = ast.parse(path.read_text())
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    return {m for m in found if m == "clips4" or m.startswith("clips4.")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for m in _imports(path, name, mods):
            while m and m not in mods:  # `from clips4.x import name` names a module or an attribute
                m = m.rpartition(".")[0]
            if m and m != name:
                deps.add(m)
        graph[name] = deps
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def test_nothing_imports_upwards():
    bad = [f"{m} imports {d}" for m, deps in _graph().items() for d in deps if _top(d) not in ALLOWED[_top(m)]]
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_package_folder_is_listed_for_the_wheel():
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    wanted = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert wanted <= listed, f"packages missing from pyproject: {sorted(wanted - listed)}"
    assert "evaluate" not in cfg["package-dir"], "evaluate must not become a top-level package"


@pytest.mark.parametrize("code", [
    "import clips4.cli.app", "import clips4", "import clips4.pipeline.config", "import clips4.trainer.config",
    # a usage error of a torch command is reported before torch is imported
    "from clips4.cli import main; assert main(['evaluate', 'language', '--root', '.', '--prior-matching', 'train', "
    "'--prior-mode', 'bogus']) == 2",
])
def test_cli_and_config_import_without_torch(code):
    out = subprocess.run([sys.executable, "-c", f"{code}; import sys; print('torch' in sys.modules, 'ray' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], f"{code} imported torch/ray"


def test_training_and_evaluation_import_no_torchvision():
    """torchvision imports torch._dynamo (through torchvision.ops): about half of a training process's start-up.
    Only an ImageNet backbone needs it, and loads it when built."""
    code = ("import clips4.trainer.train, clips4.trainer.augment, clips4.evaluate.language, "
            "clips4.pipeline.invariances, sys; print(sorted(m for m in sys.modules if m.startswith('torchvision'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


#: stages.yaml's ``run:`` names code by string, which the import graph above cannot see. The pipeline loads these by
#: name; a module outside clips4.pipeline is allowed here only explicitly, and only if it imports no torch.
RUN_OUTSIDE_PIPELINE = {
    "clips4.trainer.config": "the train stage's params model (TrainParams, TrainStage): run by `clips4 train`",
}


def test_stage_registry_names_only_pipeline_code_or_listed_torch_free_modules():
    import yaml

    stages = yaml.safe_load((REPO / "stages.yaml").read_text())["stages"]
    runs = {name: decl["run"].partition(":")[0] for name, decl in stages.items()}
    outside = {name: mod for name, mod in runs.items() if _top(mod) != "clips4.pipeline"}
    assert set(outside.values()) <= set(RUN_OUTSIDE_PIPELINE), f"stages.yaml runs unlisted upper-layer code: {outside}"
    for mod in set(outside.values()):
        code = f"import sys, {mod}; assert 'torch' not in sys.modules, 'torch imported'"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert p.returncode == 0, f"{mod}: {p.stderr[-500:]}"


#: Code named by a string (``package.module:Factory`` backend specs, modules named for their exceptions) in the code
#: and the bundled configs: a dependency the import graph cannot see. A string that names a layer its package may
#: not import is allowed only where listed here, with why (``stages.yaml``'s ``run:`` strings: the test above).
BY_NAME_ACROSS_LAYERS = {
    ("clips4.pipeline.config", "clips4.synthetic:make_teacher"):
        "MOVED_BACKENDS: the synthetic teacher's old backend spelling is read as this one",
    ("data/configs/synthetic.yaml", "clips4.synthetic:make_teacher"):
        "the bundled synthetic config's clip.backend, which the pipeline loads by name",
}
_NAMED = re.compile(r"^clips4(\.[A-Za-z_]\w*)+(:[A-Za-z_][\w.]*)?$")


def _named_code() -> set[tuple[str, str, str]]:
    """``(where, its package, spec)`` for every string naming clips4 code: a ``module:attr`` spec, or a module name."""
    mods = _modules()

    def named(s: str) -> bool:
        return bool(_NAMED.match(s)) and (":" in s or s in mods)

    found = set()
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and named(node.value):
                found.add((name, _top(name), node.value))
    import yaml

    def strings(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)
        elif isinstance(v, str):
            yield v

    for f in sorted((REPO / "data" / "configs").glob("*.yaml")):
        where = f.relative_to(REPO).as_posix()
        found |= {(where, "clips4.data", s) for s in strings(yaml.safe_load(f.read_text())) if named(s)}
    return found


def _resolves(spec: str) -> bool:
    from clips4.pipeline.config import MOVED_BACKENDS

    mod, _, attr = MOVED_BACKENDS.get(spec, spec).partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return False
    return True


def test_code_named_by_string_respects_the_layers_or_is_listed():
    found = _named_code()
    across = {(where, spec) for where, pkg, spec in found if _top(spec.partition(":")[0]) not in ALLOWED[pkg]}
    assert across <= set(BY_NAME_ACROSS_LAYERS), f"unlisted by-name references across layers: {sorted(across - set(BY_NAME_ACROSS_LAYERS))}"
    assert set(BY_NAME_ACROSS_LAYERS) <= across, f"listed but gone: {sorted(set(BY_NAME_ACROSS_LAYERS) - across)}"
    unresolved = sorted(spec for _, _, spec in found if not _resolves(spec))
    assert not unresolved, f"strings naming clips4 code that does not exist (nor moved): {unresolved}"
