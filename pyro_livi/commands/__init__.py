"""Subcommands of ``pyro-livi``; each module exposes ``register(subparsers)``."""
