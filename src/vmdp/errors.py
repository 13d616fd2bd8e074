"""One exception hierarchy: each error names the problem and the fix and carries its exit code.

The CLI's single top-level handler turns these into one line on stderr; anything else
is a bug and is shown with a traceback.
"""

from __future__ import annotations


class VmdpError(Exception):
    """A failure the user can act on (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(VmdpError):
    """Bad input: an unknown VM, a bad date, a missing file (exit code 2)."""

    exit_code = 2


class NotFound(UsageError):
    """The thing the user named does not exist."""


class TargetExists(UsageError):
    """A restore would overwrite a file."""


class HypervisorError(VmdpError):
    """QEMU refused or failed an operation."""


class RepositoryError(VmdpError):
    """The repository is unusable: missing, unreadable, full or of an unknown format."""


class CorruptData(RepositoryError):
    """Stored data does not match its digest: never restored silently."""


class LockedError(VmdpError):
    """Another vmdp process holds the lock this operation needs."""
