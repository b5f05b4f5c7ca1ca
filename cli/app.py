"""The ``clips4`` command line: the groups and commands, and ``main(argv)`` (callable from tests), which maps every
error to its exit code without a traceback (``CLIPS4_DEBUG=1`` shows it)."""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from typing import NoReturn

import typer

from clips4.cli import cache, demo, evaluate, precompute, predict, project, report, synthetic, train
from clips4.cli.common import (EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, CLIError, emit_summary,
                               err_console)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("clips4")
        except PackageNotFoundError:
            v = "unknown (not installed)"
        print(f"clips4 {v}")
        raise typer.Exit(0)


app = typer.Typer(
    name="clips4",
    help="CLIP-S4: language-guided self-supervised semantic segmentation — offline pipeline and trainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """CLIP-S4: language-guided self-supervised semantic segmentation — offline pipeline and trainer."""


#: the command groups and their help
GROUPS = {
    "precompute": "Run the offline pipeline stages into the cache.",
    "evaluate": "Evaluate contours, segments and embeddings.",
    "cache": "Inspect the stage caches.",
    "synthetic": "The synthetic world: textured classes with known masks and a CLIP-like teacher.",
}
#: every command, in --help order: functions made commands by ``common_options(name, ...)``, registered under that
#: name (``"precompute segments"``: the group, then the command). The one place a command is registered.
COMMANDS = (
    project.status, project.repro, train.train, train.train_contours, predict.predict, predict.search, report.report,
    demo.demo,
    precompute.segments, precompute.clip_features, precompute.prototypes,
    evaluate.language, evaluate.unsupervised, evaluate.avgsim, evaluate.class_free, evaluate.davis, evaluate.boundaries,
    cache.ls, cache.verify, cache.gc,
    synthetic.make, synthetic.config,
)


def _register(commands=COMMANDS, groups=GROUPS) -> None:
    subapps = {}
    for group, text in groups.items():
        subapps[group] = typer.Typer(help=text, no_args_is_help=True)
        app.add_typer(subapps[group], name=group)
    for fn in commands:
        *group, name = fn.command_name.split(" ")
        (subapps[group[0]] if group else app).command(name)(fn)


_register()


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so that ``finally`` blocks run (stages commit finished parts)."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated()


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix (bad config, input, missing file / weights / package): exit 2."""
    from clips4.pipeline.config import ConfigError
    from clips4.pipeline.datasets import DatasetError

    errs: list[type[BaseException]] = [CLIError, ConfigError, DatasetError, FileNotFoundError, NotADirectoryError,
                                       PermissionError, ImportError]
    for mod, names in (("clips4.pipeline.safepath", ("UnsafePathError",)), ("clips4.pipeline.stage", ("StageError",)),
                       ("clips4.pipeline.runner", ("WorkerStartError",)),
                       ("clips4.pipeline.clip.weights", ("WeightsNotFoundError", "WeightsMismatchError")),
                       ("clips4.trainer.checkpoint", ("CheckpointError",)), ("clips4.trainer.model", ("WeightsError",))):
        m = sys.modules.get(mod)  # only what was imported can have been raised
        errs += [getattr(m, n) for n in names if m is not None and hasattr(m, n)]
    return tuple(errs)


def _exit_code(exc: BaseException) -> int:
    """The documented exit code of an exception that ended a command."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(exc, _Terminated):
        return EXIT_SIGTERM
    code = getattr(exc, "exit_code", None)  # StageLocked 3, RunFailed 1, StageInterrupted 130/143, RayConnectError 2
    if isinstance(code, int) and type(exc).__module__.startswith("clips4."):
        return code
    if isinstance(exc, _user_errors()):
        return EXIT_USAGE
    return EXIT_FAILED


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT); finished work is kept, a rerun continues"
    if isinstance(exc, _Terminated):
        return "terminated (SIGTERM); finished work is kept, a rerun continues"
    if isinstance(exc, ImportError):
        return (f"a package is missing: {exc}. Install the extra that provides it, e.g. pip install 'clips4[s3]' "
                f"for s3:// URLs, 'clips4[tensorboard]' for TensorBoard, 'clips4[gpu]' for FAISS on GPU")
    text = _without_worker_traceback(str(exc)) or type(exc).__name__
    if isinstance(exc, CLIError) or type(exc).__module__.startswith("clips4"):
        return text
    return f"{type(exc).__name__}: {text}"  # e.g. "OSError: [Errno 28] No space left on device": name the cause


def _without_worker_traceback(text: str) -> str:
    """An error re-raised from a DataLoader worker carries the worker's traceback in its message ("Caught X in
    DataLoader worker process 0. Original Traceback …"): keep only the error's own line."""
    if "Original Traceback (most recent call last)" not in text:
        return text
    last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and all(p.isidentifier() for p in head.split(".")) else last


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status instead of exiting (tests call ``main([...])``)."""
    import click

    from clips4.pipeline.console import tolerate_closed_output

    debug = os.environ.get("CLIPS4_DEBUG", "") not in ("", "0")
    saved_streams = tolerate_closed_output()  # a reader that went away (`| head`) never stops the work
    saved_hook = threading.excepthook
    threading.excepthook = functools.partial(_thread_failed, debug)
    old = signal.getsignal(signal.SIGTERM)
    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (a test calling main from a worker thread)
        in_main_thread = False
    try:
        rv = app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return EXIT_SIGINT
    except Exception as exc:  # noqa: BLE001 - typer's bundled click raises its own copies of click's exceptions
        # every usage error of either copy (no such option, a bad value, a flag given a value, ...) by its ancestry
        if isinstance(exc, click.ClickException) or {c.__name__ for c in type(exc).__mro__} & {"ClickException",
                                                                                                 "NoArgsIsHelpError"}:
            if type(exc).__name__ == "NoArgsIsHelpError":
                return 0
            exc.show()
            return getattr(exc, "exit_code", EXIT_USAGE) or EXIT_USAGE
        return _fail(exc, debug)
    except KeyboardInterrupt as exc:  # not an Exception; _Terminated is, and is handled above
        return _fail(exc, debug)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, old)
        threading.excepthook = saved_hook
        if argv is not None:  # called from Python (tests): give the caller its streams back
            sys.stdout, sys.stderr = saved_streams


def _thread_failed(debug: bool, args) -> None:
    """A background thread's uncaught exception: one line naming the thread and the cause (the traceback only with
    CLIPS4_DEBUG=1). The main thread's own work reports its failure with its own message."""
    if args.exc_type is SystemExit:
        return
    if debug:
        import traceback

        traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback)
    name = args.thread.name if args.thread is not None else "?"
    text = " ".join(str(args.exc_value).split())[:300]
    try:
        err_console.print(f"error: background thread {name}: {args.exc_type.__name__}: {text}", markup=False)
    except Exception:  # noqa: BLE001 - nowhere left to say it
        pass


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once its work is done, skipping the interpreter's native teardown.

    Why: at finalisation a native thread pool (pyarrow's Parquet reader, apache/arrow#34314) can be destroyed while
    a worker is still joinable; ``std::terminate`` then aborts a run that finished and committed its outputs, and
    cron sees SIGABRT (-6) instead of 0 (seen intermittently on a loaded machine). Everything the normal exit does
    for Python code still happens, in its order: non-daemon threads are joined, the ``atexit`` handlers run (Ray's
    shutdown, logging, multiprocessing), stdout and stderr are flushed; only the native destructors are skipped."""
    import atexit
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced streams, a reader that went away
            pass
    os._exit(code)


def _fail(exc: BaseException, debug: bool) -> int:
    code = _exit_code(exc)
    msg = _message(exc)
    if debug:
        import traceback

        traceback.print_exception(exc)
    err_console.print(f"error: {msg}", markup=False)
    if not debug and code == EXIT_FAILED and not type(exc).__module__.startswith("clips4"):
        err_console.print("(set CLIPS4_DEBUG=1 to see the traceback)")
    emit_summary({}, code, error=msg)
    return code
