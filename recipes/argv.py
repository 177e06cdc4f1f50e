"""Reading and editing a recipe's argument list (`--name value`, `--name=value`, bare `--flag`) where one script
drives another (the demo its stages, on-policy DPO its rounds) without parsing the other's whole schema."""

from __future__ import annotations


def option_value(argv: list[str], name: str, default: str | None = None) -> str | None:
    """The value `argv` gives `name`, the last one winning as in argparse; a bare flag (`--name` followed by
    another option or nothing) reads "true"; `default` when absent."""
    value = default
    for i, arg in enumerate(argv):
        if arg == name:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true"
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name` and its value (`--name value` or `--name=value`)."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == name:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept
