"""SpecError: what every stage raises for a problem the user can fix, in a module that imports nothing,
so that the command line can report it without loading SymPy."""

from __future__ import annotations


class SpecError(Exception):
    """A problem with a spec, reported to the user as one line (no traceback)."""

    def __init__(self, message: str, *, path: str = "<spec>", line: int | None = None,
                 column: int | None = None, op: str | None = None):
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.op = op
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        op = f" op '{self.op}':" if self.op else ""
        return f"{where}:{op} {self.message}"
