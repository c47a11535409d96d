"""Command-line flags of the gin-configured commands (T5X's conventions).

--gin_file=F (repeatable), --gin.X=Y (repeatable; = a binding line `X = Y`),
--gin_bindings='X = Y' (repeatable), --gin_search_paths=a,b (the repository root and its gin/
directory are always searched, after these), plus each command's own --name=value flags.
"""
import dataclasses
from typing import Dict, List, Sequence

from ssr_jax.errors import UserError


@dataclasses.dataclass
class Flags:
    gin_files: List[str]
    bindings: List[str]
    search_paths: List[str]
    other: Dict[str, str]  # remaining --name=value flags, for the entry point to use


def parse_flags(argv: Sequence[str], allowed_other: Sequence[str] = ()) -> Flags:
    """Parses gin flags (and the entry point's own `allowed_other` flags)."""
    flags = Flags([], [], [], {})
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; use --gin_file=F, --gin.X=Y or "
                            "--gin_search_paths=a,b.")
        name, has_eq, value = arg[2:].partition("=")
        if not has_eq and not name.startswith("gin."):
            if i + 1 >= len(args):
                raise UserError(f"flag --{name} needs a value.")
            value, i = args[i + 1], i + 1
        if name == "gin_file":
            flags.gin_files.append(value)
        elif name.startswith("gin."):
            if not has_eq:
                raise UserError(f"flag {arg!r} needs a value: --gin.X=Y.")
            flags.bindings.append(f"{name[4:]} = {value}")
        elif name == "gin_bindings":
            flags.bindings.append(value)
        elif name == "gin_search_paths":
            flags.search_paths.extend(p for p in value.split(",") if p)
        elif name in allowed_other:
            flags.other[name] = value
        else:
            known = ["gin_file", "gin.X", "gin_bindings", "gin_search_paths", *allowed_other]
            raise UserError(f"unknown flag --{name}; known flags: "
                            + ", ".join("--" + k for k in known) + ".")
        i += 1
    return flags
