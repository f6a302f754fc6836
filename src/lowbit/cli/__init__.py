"""The ``lowbit`` command: :mod:`lowbit.cli.main` parses and dispatches; each other module adds
one subcommand with ``register(subparsers)``."""
