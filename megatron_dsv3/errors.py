"""The error users see for bad input: what is wrong, where, and how to fix it."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """Invalid user input (a preset, a recipe, an argument, a parallel layout).

    ``str()`` reads: ``<where>: <problem>. Fix: <fix> (did you mean 'x'?)``.  ``where`` is a recipe
    file and line or an argument name; ``key`` names the field.  The suggestion is the closest of
    ``choices`` to the bad ``value`` (or to ``key`` itself, for an unknown key).
    """

    def __init__(
        self,
        problem: str,
        *,
        fix: str,
        key: str | None = None,
        where: str | None = None,
        value: str | None = None,
        choices: list[str] | None = None,
    ):
        self.problem = problem
        self.fix = fix
        self.key = key
        self.where = where
        self.suggestion = did_you_mean(str(value) if value is not None else key, choices)
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        text += f". Fix: {self.fix}"
        if self.suggestion:
            text += f" (did you mean '{self.suggestion}'?)"
        return text

    def located(self, where: str) -> "ConfigError":
        """The same error, placed at ``where`` (for example ``recipe.yaml:12``)."""
        err = ConfigError(self.problem, fix=self.fix, key=self.key, where=where)
        err.suggestion = self.suggestion
        err.args = (err._render(),)
        return err


def did_you_mean(word: str, choices: list[str] | None) -> str | None:
    if not word or not choices or word in choices:
        return None
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None
