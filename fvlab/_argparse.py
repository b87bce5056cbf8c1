"""The argument parser every ``fvlab`` command uses, and the exit codes: 0 ok, 1 failed while running, 2 bad input."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT", "ArgumentParser"]

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations (``--f`` is not ``--force``) and with one-line errors (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.own_options: list[str] = []  # each option's first spelling, for error messages
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """argparse's ``add_argument``, remembering the option's name (``--help`` aside)."""
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.dest != "help":
            self.own_options.append(action.option_strings[0])
        return action

    def error(self, message: str) -> None:
        """Exit with code 2 and a one-line message (argparse prints the whole usage)."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")
