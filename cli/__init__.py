"""``clips4.cli``: the command line. One module per command group (:mod:`.precompute`, :mod:`.train`,
:mod:`.evaluate`, :mod:`.predict` (predict + search), :mod:`.cache`, :mod:`.synthetic`, :mod:`.demo`,
:mod:`.report`): each command a function made one by :func:`.common.common_options`; every option that several
commands share declared once in :data:`.common.OPTIONS`; every command registered from :data:`.app.COMMANDS`, and
``main`` in :mod:`.app`. Heavy packages (torch, ray, the evaluations) are imported inside command bodies, so
``clips4 --help`` starts fast."""


def main(argv: list[str] | None = None) -> int:
    from clips4.cli.app import main as _main

    return _main(argv)


def run() -> None:
    """The ``clips4`` console script and ``python -m clips4.cli``: :func:`main`, then the process exits with its
    status *without* the interpreter's native teardown (:func:`clips4.cli.app.exit_now`)."""
    from clips4.cli.app import exit_now

    exit_now(main())
