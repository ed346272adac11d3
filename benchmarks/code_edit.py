"""The code-edit workload: functions of this repository's own source, each with an instruction to rename a
variable, add a docstring or change a literal, built at run time (so it follows the code as it changes).

An editing model answers with the whole function again, most of it copied from the prompt: the workload
prompt-lookup speculation (`--speculative-ngram`) is for. Functions are chosen by a seeded shuffle among
those of a size a small model copies whole."""

from __future__ import annotations

import ast
import random
import textwrap
from dataclasses import dataclass
from pathlib import Path

from benchmarks.workload import REPO_ROOT

KINDS = ("rename", "docstring", "literal")


@dataclass(slots=True)
class EditTask:
    """One edit: the function's source and the instruction, and where the function came from."""

    id: str
    where: str  # file:line
    kind: str
    instruction: str
    source: str

    def messages(self) -> list[dict[str, str]]:
        return [
            {
                "role": "user",
                "content": f"{self.instruction} Reply with the whole updated function only.\n\n"
                f"```python\n{self.source}\n```",
            }
        ]


def _functions(root: Path, min_lines: int, max_lines: int) -> list[tuple[Path, ast.FunctionDef, str]]:
    """Every function of `root`'s fitllm package of `min_lines` to `max_lines` lines, with its file text."""
    found = []
    for path in sorted((root / "fitllm").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.FunctionDef)
                and min_lines <= node.end_lineno - node.lineno + 1 <= max_lines
            ):
                found.append((path, node, text))
    return found


def _source(node: ast.FunctionDef, text: str, drop_docstring: bool = False) -> str:
    lines = text.splitlines()[node.lineno - 1 : node.end_lineno]
    if drop_docstring and node.body and isinstance(node.body[0], ast.Expr):
        doc = node.body[0]
        if isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
            del lines[doc.lineno - node.lineno : doc.end_lineno - node.lineno + 1]
    return textwrap.dedent("\n".join(lines))


def _variables(node: ast.FunctionDef) -> list[str]:
    names = {a.arg for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")}
    names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return sorted(n for n in names if len(n) >= 3)


def _literals(node: ast.FunctionDef) -> list[int | str]:
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    out = []
    for stmt in body:
        for n in ast.walk(stmt):
            if not isinstance(n, ast.Constant) or isinstance(n.value, bool):
                continue
            if isinstance(n.value, int) or (isinstance(n.value, str) and 2 <= len(n.value) <= 30):
                out.append(n.value)
    return out


def edit_tasks(
    count: int, seed: int = 0, root: Path = REPO_ROOT, min_lines: int = 8, max_lines: int = 24
) -> list[EditTask]:
    """`count` edits, kinds in turn (rename, docstring, literal), over functions in a seeded order."""
    functions = _functions(root, min_lines, max_lines)
    random.Random(seed).shuffle(functions)
    tasks: list[EditTask] = []
    for path, node, text in functions:
        if len(tasks) == count:
            break
        kind = KINDS[len(tasks) % len(KINDS)]
        where = f"{path.relative_to(root)}:{node.lineno}"
        if kind == "rename":
            names = _variables(node)
            if not names:
                continue
            old = names[len(tasks) % len(names)]
            instruction = f"Rename the variable `{old}` to `{old}_renamed` in this Python function."
            source = _source(node, text)
        elif kind == "docstring":
            instruction = "Add a one-line docstring to this Python function."
            source = _source(node, text, drop_docstring=True)
        else:
            literals = _literals(node)
            if not literals:
                continue
            old = literals[len(tasks) % len(literals)]
            new = old + 1 if isinstance(old, int) else old.upper() if old.upper() != old else old + "_new"
            instruction = f"Change the literal {old!r} to {new!r} in this Python function."
            source = _source(node, text)
        tasks.append(EditTask(f"edit-{len(tasks):02d}", where, kind, instruction, source))
    if len(tasks) < count:
        raise ValueError(f"only {len(tasks)} functions of {min_lines}-{max_lines} lines fit; asked {count}")
    return tasks
