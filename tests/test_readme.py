"""
README.rst against the code: the configuration table lists every setting of
:data:`loghandler.config.SETTINGS` (and nothing else) with its ``twistd loghandler``
option and its default, so that it stays true as settings are added.
"""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from loghandler.config import SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.rst")

#: The option cell of a secret, which has no option.
ENVIRONMENT_ONLY = "(environment only)"


def readme() -> str:
    """The text of README.rst."""
    with open(README, encoding="utf-8") as f:
        return f.read()


def simple_table(text: str, header: list[str]) -> list[list[str]]:
    """
    The rows of the reStructuredText simple table of ``text`` whose header row has
    the cells ``header``: each row its cells, a cell's lines joined by spaces (a line
    with an empty first cell continues the row above).

    :raises AssertionError: when there is no such table.
    """
    lines = text.splitlines()
    for i in range(1, len(lines) - 1):
        border = lines[i - 1]
        if not re.fullmatch(r"=+( +=+)*", border) or lines[i + 1] != border:
            continue
        spans = [m.span() for m in re.finditer(r"=+", border)]

        def cells(line: str) -> list[str]:
            # The last column runs to the end of the line.
            ends = [start for start, _ in spans[1:]] + [len(line)]
            return [line[start:end].strip() for (start, _), end in zip(spans, ends)]

        if cells(lines[i]) != header:
            continue
        rows: list[list[str]] = []
        for line in lines[i + 2 :]:
            if line == border:
                return rows
            row = cells(line)
            if row[0]:
                rows.append(row)
            elif any(row):
                rows[-1] = [" ".join(filter(None, pair)) for pair in zip(rows[-1], row)]
        raise AssertionError(f"the table {header} does not end")
    raise AssertionError(f"no table with the header {header} in README.rst")


class ConfigurationTableTests(SynchronousTestCase):
    """The Configuration section's table against ``loghandler.config.SETTINGS``."""

    def setUp(self) -> None:
        rows = simple_table(readme(), ["variable", "twistd option", "default", "meaning"])
        self.rows = {row[0]: row for row in rows}
        self.assertEqual(len(self.rows), len(rows), "a variable has two rows")

    def test_every_setting_and_nothing_else(self) -> None:
        """The table lists exactly the settings of config.py, in their order."""
        self.assertEqual(list(self.rows), [setting.env for setting in SETTINGS])

    def test_options(self) -> None:
        """
        Each row names the setting's ``twistd loghandler`` option, or says that a
        secret is read from the environment only.
        """
        for setting in SETTINGS:
            expected = ENVIRONMENT_ONLY if setting.secret else "--" + setting.option
            self.assertEqual(self.rows[setting.env][1], expected, setting.env)

    def test_defaults(self) -> None:
        """
        A setting with a default shows it as the variable is written (the default
        cell starts with it: ``10, 30 (Azure)`` for CHECKPOINT_S); one without says
        why in words or parentheses (``required``, ``(chain)``).
        """
        for setting in SETTINGS:
            shown = self.rows[setting.env][2]
            if setting.default_text:
                self.assertTrue(
                    re.match(re.escape(setting.default_text) + r"\b", shown),
                    f"{setting.env}: default {setting.default_text!r}, README says {shown!r}",
                )
            else:
                self.assertTrue(shown == "required" or shown.startswith("("), setting.env)

    def test_meanings(self) -> None:
        """Every row says what the setting means."""
        for env, row in self.rows.items():
            self.assertTrue(row[3], env)

    def test_parser_joins_continuation_lines(self) -> None:
        """simple_table joins a row's continuation lines cell by cell."""
        text = "\n".join(
            [
                "==  ====  =====",
                "a   b     c",
                "==  ====  =====",
                "x   1     one",
                "    2     two",
                "y         three",
                "==  ====  =====",
            ]
        )
        self.assertEqual(
            simple_table(text, ["a", "b", "c"]), [["x", "1 2", "one two"], ["y", "", "three"]]
        )
