"""One way to register a command and one declaration per option: every command is a function made one by
``common_options(name, ...)`` and registered from ``clips4.cli.app.COMMANDS`` under that name, and an option that
several commands have (or that sets a configuration key) is declared once, in ``clips4.cli.common.OPTIONS``."""
import ast
import inspect
from collections import defaultdict
from pathlib import Path

from typer.models import OptionInfo

from clips4.cli import app as app_module
from clips4.cli import common

CLI = Path(app_module.__file__).resolve().parent


def _commands(typer_app=app_module.app, prefix=()):
    """(command line, callback) of every command of the app, groups included."""
    for c in typer_app.registered_commands:
        yield " ".join((*prefix, c.name)), c.callback
    for g in typer_app.registered_groups:
        yield from _commands(g.typer_instance, (*prefix, g.name))


def _flags(info: OptionInfo, param: str) -> list[str]:
    """The flags of an option (``--a/--no-a`` counts as ``--a`` and ``--no-a``; none given: typer's from the name)."""
    decls = [d for d in (info.param_decls or ()) if d.startswith("-")]
    return [f for d in decls for f in d.split("/")] or ["--" + param.replace("_", "-")]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield node, (f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""), f


def test_every_command_is_registered_once_from_the_one_table():
    found = list(_commands())
    for name, cb in found:
        assert getattr(cb, "command_name", None) == name, f"{name}: not made a command by common_options({name!r})"
    callbacks = [cb for _, cb in found]
    assert len(callbacks) == len(set(callbacks)) == len(app_module.COMMANDS)
    assert set(callbacks) == set(app_module.COMMANDS)
    assert [g.name for g in app_module.app.registered_groups] == list(app_module.GROUPS)
    # every function made a command in a cli module is in the table (none written and forgotten)
    made = {f"{m}.{n}" for m in ("project", "train", "predict", "report", "demo", "precompute", "evaluate", "cache",
                                 "synthetic")
            for n, obj in vars(__import__(f"clips4.cli.{m}", fromlist=["_"])).items()
            if hasattr(obj, "command_name") and obj.__module__ == f"clips4.cli.{m}"}
    listed = {f"{cb.__module__.rsplit('.', 1)[1]}.{cb.__name__}" for cb in app_module.COMMANDS}
    assert made == listed, f"made but not listed: {sorted(made - listed)}; listed but not made: {sorted(listed - made)}"


def test_no_module_registers_commands_another_way():
    """Only cli/app.py builds a typer app or registers, in its one loop; the command modules only define functions."""
    for path in sorted(CLI.glob("*.py")):
        tree = ast.parse(path.read_text())
        regs = [(name, node.lineno) for node, name, _ in _calls(tree)
                if name in ("Typer", "command", "add_typer", "callback")]
        if path.name == "app.py":
            assert sorted(n for n, _ in regs) == ["Typer", "Typer", "add_typer", "callback", "command"], regs
        else:
            assert not regs, f"{path.name} registers commands itself: {regs}"


def test_an_option_of_several_commands_is_declared_once():
    users: dict[str, list[tuple[str, str, OptionInfo]]] = defaultdict(list)
    for name, cb in _commands():
        for p in inspect.signature(cb).parameters.values():
            if isinstance(p.default, OptionInfo):
                for flag in _flags(p.default, p.name):
                    users[flag].append((name, p.name, p.default))
    declared = {f: n for n, o in common.OPTIONS.items() for f in _flags(typer_option(o), n)}
    counted = defaultdict(int)
    for n, o in common.OPTIONS.items():
        for f in _flags(typer_option(o), n):
            counted[f] += 1
    assert not [f for f, c in counted.items() if c > 1], "a flag declared twice in OPTIONS"
    for flag, uses in users.items():
        commands = {u[0] for u in uses}
        tags = {getattr(info, "clips4_option", None) for _, _, info in uses}
        if len(commands) > 1 or flag in declared:
            assert tags == {declared.get(flag)}, (
                f"{flag} ({', '.join(sorted(commands))}): declare it once in clips4.cli.common.OPTIONS and take it "
                f"with option(); found {sorted(map(str, tags))}")


def typer_option(o: common.Opt) -> OptionInfo:
    import typer

    return typer.Option(o.default, *o.flags)


def test_no_module_declares_a_shared_option_inline():
    """A ``typer.Option`` written in a command module declares an option of that command only: none of OPTIONS's
    flags, and no flag twice."""
    shared = {f for n, o in common.OPTIONS.items() for f in _flags(typer_option(o), n)}
    seen: dict[str, str] = {}
    for path in sorted(CLI.glob("*.py")):
        if path.name == "common.py":
            continue
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            args = fn.args.args[len(fn.args.args) - len(fn.args.defaults):] + fn.args.kwonlyargs
            defaults = fn.args.defaults + [d for d in fn.args.kw_defaults if d is not None]
            for arg, d in zip(args, defaults):
                if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "Option":
                    decls = [a.value for a in d.args[1:] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                    flags = [f for x in decls for f in x.split("/") if f.startswith("-")] or [
                        "--" + arg.arg.replace("_", "-")]
                    for f in flags:
                        where = f"{path.name}:{d.lineno}"
                        assert f not in shared, f"{where}: {f} is declared in OPTIONS: use option({arg.arg!r}, ...)"
                        assert f not in seen, f"{f} declared inline twice: {seen[f]} and {where}"
                        seen[f] = where
        for node, name, _ in _calls(tree):  # and no module-level typer.Option constants
            if name == "Option" and not any(node in ast.walk(fn) for fn in ast.walk(tree)
                                            if isinstance(fn, ast.FunctionDef)):
                raise AssertionError(f"{path.name}:{node.lineno}: a module-level typer.Option")


def test_settings_and_stage_options_become_set_items():
    from clips4.cli.common import Common

    seen = {}

    def fake(*, opts: Common):
        seen["sets"] = opts.stage_sets

    cmd = common.common_options("x", stage="prototypes",
                                settings={"prototypes.seed": common.option("seed", None, help="h")})(fake)
    params = inspect.signature(cmd).parameters
    assert {"seed", "detector", "classes", "root"} <= set(params)
    kwargs = {k: None for k in params}
    kwargs.update(quiet=False, json=False, seed=3, classes="none", detector="classical")
    cmd(**kwargs)
    assert seen["sets"] == ['segments.detector="classical"', "prototypes.classes=null", "prototypes.seed=3"]
