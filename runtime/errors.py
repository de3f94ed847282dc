"""The errors a user's input can cause: one family, caught once by the CLI and printed as one line.

    UserError                 anything the user can fix: a file, a field, an option, a model
      InputError              one record of an input file: its file, line, field and item id
      SpecError               a task spec (a file, or the JSON embedded in a GGUF): every problem
      ModelError              a model file that cannot be used
      OutputError             an output that would replace or reach past what the command owns

Every stage raises these (train's ConfigError, export's ExportError ... subclass UserError), so
`annotate-cli` turns the family into one line and exit 1, and anything else, a bug, keeps its
traceback. This module imports nothing of the project: every other module may import it.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem the user can fix; its message says where and what to do."""


class InputError(UserError, ValueError):
    """A problem with one input record: where it is and what to do about it."""

    def __init__(self, path: str, line: int | None, message: str, field: str | None = None,
                 item_id: str | None = None):
        self.path, self.line, self.field, self.item_id, self.reason = path, line, field, item_id, message
        where = f"{path}:{line}" if line is not None else path
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")

    def to_record(self) -> dict[str, Any]:
        """The `error` of an error record (the item's id goes beside it); from_record reads it back."""
        return {"file": self.path, "line": self.line, "field": self.field, "message": self.reason}

    @classmethod
    def from_record(cls, rec: dict[str, Any], item_id: str | None = None) -> InputError:
        return cls(rec["file"], rec["line"], rec["message"], rec["field"], item_id)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, so it crosses process (and Ray) boundaries intact
        return (InputError, (self.path, self.line, self.reason, self.field, self.item_id))


class SpecError(UserError, ValueError):
    """A spec that cannot be used; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid task spec ({len(problems)} problem(s)):\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (SpecError, (self.source, self.problems))


class ModelError(UserError, RuntimeError):
    """A model file that cannot be used; the message names the file and what to do."""


class OutputError(UserError):
    """An output the command will not write: it exists (and --force was not given), it is one of
    the command's inputs, it is a folder, or (--resume) it holds what this job did not write."""
