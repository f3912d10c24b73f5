"""Required DataModule arguments: one message, shared by the DataModules and the CLI, that names each unset argument
and the flag that sets it."""

from __future__ import annotations


def missing_message(missing: list[tuple[str, str]], section: str = "data") -> str:
    """``section.init_args.KEY is not set: WHAT (add --section.init_args.KEY=...)`` for each (KEY, WHAT)."""
    return "; ".join(
        f"{section}.init_args.{key} is not set: {what} (add --{section}.init_args.{key}=...)" for key, what in missing
    )
