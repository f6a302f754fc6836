"""CLI subcommands: each module defines ``register(subparsers)`` adding one command."""
