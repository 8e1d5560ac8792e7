"""One module per ``postdiff`` sub-command, each with ``add_parser(subparsers)`` and ``run(args) -> exit status``."""

COMMANDS = ("generate", "export", "plan", "bench", "sweep", "eval", "demo", "env")
