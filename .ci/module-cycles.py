#!/usr/bin/env python3
"""Finds import cycles between the files of a crate's `src/` (the runtime's layering check).

Every `crate::a::b` and `super::x` path in a file (in `use` lines and in code) is an edge to
the file that defines the longest prefix of that path. A strongly connected component of
more than one file is a cycle. Cycles named on the command line with `--allow a.rs,b.rs`
are accepted; anything else fails with the files of each cycle.

Usage: module-cycles.py SRC_DIR [--allow FILE,FILE ...]
"""

import re
import sys
from pathlib import Path


def module_files(src: Path) -> dict[tuple[str, ...], Path]:
    """Module path (without `crate`) -> file."""
    files = {}
    for f in src.rglob("*.rs"):
        rel = f.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] in ("mod", "lib"):
            parts = parts[:-1]
        files[tuple(parts)] = f
    return files


def strip_comments(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def strip_tests(text: str) -> str:
    """Drops `#[cfg(test)] mod tests { ... }` (test code may reach anywhere)."""
    out = []
    i = 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand_use_groups(text: str) -> list[list[str]]:
    """Paths of `crate::`/`super::`/`self::` mentions, `use` groups expanded one level."""
    paths = []
    for m in re.finditer(r"\b(crate|super|self)((?:::\w+)*)(::\{([^{}]*)\})?", text):
        if not m.group(2) and m.group(4) is None:
            continue
        base = [m.group(1)] + [p for p in m.group(2).strip(":").split("::") if p]
        if m.group(4) is not None:
            for item in m.group(4).split(","):
                item = item.strip().split(" as ")[0].strip()
                if item and item != "self":
                    paths.append(base + item.split("::"))
                elif item == "self":
                    paths.append(base)
        else:
            paths.append(base)
    return paths


def resolve(path: list[str], here: tuple[str, ...], is_mod_file: bool, files) -> tuple[str, ...] | None:
    if path[0] == "crate":
        parts = path[1:]
    else:
        # The module this file is: `super` from `a/b.rs` is `a`; from `a/mod.rs` it is the
        # parent of `a`.
        cur = list(here)
        rest = path
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                cur = cur[:-1]
            rest = rest[1:]
        parts = cur + rest
    for n in range(len(parts), 0, -1):
        key = tuple(parts[:n])
        if key in files:
            return key
    return None


def sccs(graph: dict) -> list[list]:
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> int:
    src = Path(sys.argv[1])
    allowed = []
    args = sys.argv[2:]
    while args:
        if args[0] == "--allow" and len(args) > 1:
            allowed.append({a.strip() for a in args[1].split(",")})
            args = args[2:]
        else:
            print(f"unknown argument {args[0]}", file=sys.stderr)
            return 2
    files = module_files(src)
    graph = {}
    for key, f in files.items():
        text = strip_tests(strip_comments(f.read_text()))
        is_mod = f.name in ("mod.rs", "lib.rs")
        edges = set()
        for path in expand_use_groups(text):
            target = resolve(path, key, is_mod, files)
            if target is not None and target != key and target != ():
                edges.add(target)
        graph[key] = edges
    bad = []
    for comp in sccs(graph):
        if len(comp) < 2:
            continue
        names = {str(files[k].relative_to(src)) for k in comp}
        if any(names == a for a in allowed):
            print("allowed cycle:", " ".join(sorted(names)))
            continue
        bad.append(sorted(names))
    for names in bad:
        print("import cycle:", " ".join(names), file=sys.stderr)
    if not bad:
        print(f"no import cycle among {len(files)} files of {src}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
