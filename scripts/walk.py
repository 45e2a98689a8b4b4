"""The walk of a dlopt command through dlopt's own modules: which module runs, in order (issue 23).

    python scripts/walk.py [--depth 6,0] run recipes/fashion-cnn-int8.toml -o /tmp/walk.bundle --cache-dir /tmp/c

runs the CLI with `sys.setprofile` watching every Python call and return of a dlopt function, and records
the dlopt call stack (its modules) at each. What runs while a module is imported (module bodies, decorators,
dataclass and registry set-up) is left out: it says what is loaded, not the path of the command. For each depth it prints, to stderr after the command's own output, the modules
visited in order as seen that many dlopt calls down from the CLI (deeper calls count as their caller's;
0: every call), with consecutive A->B->A hops (loops) folded to "xN"; how many stops, how many are returns
to a module already left, and the entries per module.
Why a profiler and not coverage: the order of the hops is the point, and only a call/return hook sees it.
"""

from __future__ import annotations

import sys
from collections import Counter
from types import FrameType
from typing import Any


def _is_dlopt(frame: FrameType) -> bool:
    name = frame.f_globals.get("__name__", "")
    return (name == "dlopt" or name.startswith("dlopt.")) and frame.f_code.co_name != "<module>"


def _dlopt_stack(frame: FrameType | None) -> tuple[str, ...] | None:
    """The modules of the dlopt frames at or above `frame`, outermost first; None while a module is being
    imported (a module body below this script's own on the stack): what runs then is loading, not the walk."""
    found = []
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") != "__main__":
            return None
        if _is_dlopt(frame):
            found.append(frame.f_globals["__name__"])
        frame = frame.f_back
    return tuple(reversed(found))


class Walk:
    """Every change of the dlopt call stack (a dlopt function called or returning), as module stacks."""

    def __init__(self) -> None:
        self.stacks: list[tuple[str, ...]] = []

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if not _is_dlopt(frame):  # other code changes no dlopt frame
            return
        stack = _dlopt_stack(frame if event == "call" else frame.f_back) if event in ("call", "return") else None
        if stack is not None:
            self.stacks.append(stack)

    def stops(self, depth: int) -> list[str]:
        """The module running, seen `depth` library calls deep (deeper calls count as their caller's; the
        CLI's frames are depth 0: the CLI shows only while no library frame runs), with consecutive repeats
        dropped: what a reader following the command from the CLI down that far visits."""
        stops: list[str] = []
        for stack in self.stacks:
            if stack:
                library = [m for m in stack if not (m == "dlopt.cli" or m.startswith("dlopt.cli."))]
                module = library[:depth][-1] if library else stack[-1]
                if not stops or stops[-1] != module:
                    stops.append(module)
        return stops


def folded(stops: list[str]) -> list[str]:
    """Consecutive repeats of a two-module hop (A B A B A ...) as 'A <-> B xN' lines."""
    lines: list[str] = []
    i = 0
    while i < len(stops):
        j = i
        while j + 2 < len(stops) and stops[j + 2] == stops[j] and j + 1 < len(stops):
            j += 1
        if j - i >= 2:  # A B A (B ...): a loop between two modules
            lines.append(f"{stops[i]} <-> {stops[i + 1]} x{(j - i + 2) // 2}")
            i = j + 2
        else:
            lines.append(stops[i])
            i += 1
    return lines


def report(stops: list[str], title: str, show_lines: bool = True) -> None:
    lines = folded(stops)
    seen: set[str] = set()
    returns = 0
    for n, module in enumerate(stops):
        if module in seen:
            returns += 1
        seen.add(module)
    print(f"\n# {title}: {len(stops)} stops ({len(lines)} lines with two-module loops folded), {returns} of them "
          f"returns to a module already left, {len(seen)} modules", file=sys.stderr)
    if show_lines:
        for n, line in enumerate(lines, 1):
            print(f"{n:4d}  {line}", file=sys.stderr)
    print("# entries per module: " + ", ".join(f"{m} {c}" for m, c in Counter(stops).most_common()), file=sys.stderr)


def main(argv: list[str]) -> int:
    """argv: [--depth N[,N...]] [--save STACKS.json] then the dlopt command line, or --load STACKS.json
    instead of a command. Depth 0 means every call (its summary only)."""
    import json

    depths, save = [4, 6, 0], None
    while argv[:1] in (["--depth"], ["--save"], ["--load"]):
        option, value, argv = argv[0], argv[1], argv[2:]
        if option == "--depth":
            depths = [int(d) for d in value.split(",")]
        elif option == "--save":
            save = value
        else:
            walk = Walk()
            walk.stacks = [tuple(s) for s in json.loads(open(value).read())]
            for depth in depths:
                report(walk.stops(depth or 10**6), f"walk {depth} dlopt calls deep" if depth else "every call", depth > 0)
            return 0
    from dlopt.cli import main as cli

    walk = Walk()
    sys.setprofile(walk)
    code = 0
    try:
        cli.main(args=argv, prog_name="dlopt", standalone_mode=False)
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.setprofile(None)
    if save:
        with open(save, "w") as f:
            json.dump(walk.stacks, f)
    for depth in depths:
        report(walk.stops(depth or 10**6), f"walk {depth} dlopt calls deep" if depth else "every call", depth > 0)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
