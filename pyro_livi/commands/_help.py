"""Help formatting shared by the subcommands: every option shows its default."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """:class:`argparse.ArgumentDefaultsHelpFormatter` that also says "(required)" for
    required options and "(default: off)" for on/off switches, and leaves help text that
    already states its default alone."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return f"{text} (default: not set)"
        if isinstance(action.default, (list, tuple)) and not action.default:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"
