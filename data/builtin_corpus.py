"""
builtin_corpus.py: English text that ships with every CPython, for runs without downloaded data.

    python data/builtin_corpus.py          # prints the corpus size, document count and sha256

The documents, in this fixed order:
  1. the pydoc help topics (pydoc_data.topics), one document per topic, sorted by name;
  2. the standard library's docstrings, one document per module, walking the interpreter's own
     list of its modules (sys.stdlib_module_names) in sorted order, a package's files in sorted
     path order. Modules written in Python are read from their source with ast, never imported,
     so nothing runs; modules compiled into or beside the interpreter (builtins, math, posix,
     ...) are imported, since their docstrings live only in the binary, and that in a fresh
     isolated interpreter, so that what the calling process changed in them cannot leak in.
A docstring seen before (inherited boilerplate, re-exported helpers) is kept only the first time.
The corpus is therefore the same for a given Python version and platform; its sha256 and the
Python version are recorded beside everything made from it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
import inspect
import json
import platform
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

# Folders of test suites hold test data rather than documentation.
SKIPPED_FOLDERS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}
# Compiled modules not imported: readline may write terminal escapes when it loads.
SKIPPED_IMPORTS = {"readline"}
# Below this the interpreter was probably stripped of its library sources or docstrings.
MINIMUM_CORPUS_BYTES = 2_000_000


def _docstrings_in_source(path: Path) -> list[str]:
    """Docstrings of the module, its classes and functions (nested ones too), in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(ast.get_docstring(node, clean=True) or "")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _docstrings_of_compiled(name: str) -> list[str]:
    """Docstrings of an imported module and of the classes, methods and functions it defines."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception:  # a module of another platform, or an optional one not built here
        return []
    found = [inspect.getdoc(module) or ""]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            found.append(inspect.cleandoc(obj.__doc__) if isinstance(obj.__doc__, str) else "")
        if inspect.isclass(obj):
            for member, value in sorted(vars(obj).items()):
                doc = getattr(value, "__doc__", None)
                if not (member.startswith("__") and member.endswith("__")) and isinstance(doc, str):
                    found.append(inspect.cleandoc(doc))
    return found


def _module_texts(stdlib: Path) -> list[list[str]]:
    """For each standard module in sorted order, and each file of a package, its docstrings."""
    entries: list[Path | str] = []  # a source file to parse, or the name of a compiled module
    for name in sorted(sys.stdlib_module_names):
        source, package = stdlib / f"{name}.py", stdlib / name
        if source.is_file():
            entries.append(source)
        elif package.is_dir():
            files = [p for p in package.rglob("*.py") if not SKIPPED_FOLDERS & set(p.relative_to(stdlib).parts)]
            entries.extend(sorted(files, key=lambda p: p.relative_to(stdlib).parts))
        elif name not in SKIPPED_IMPORTS and name not in SKIPPED_FOLDERS and _is_compiled(name):
            entries.append(name)
    compiled = _compiled_docstrings([e for e in entries if isinstance(e, str)])
    return [compiled[e] if isinstance(e, str) else _docstrings_in_source(e) for e in entries]


def _compiled_docstrings(names: list[str]) -> dict[str, list[str]]:
    """The docstrings of compiled modules, read in a fresh isolated interpreter (python -I): the
    caller may have replaced parts of them (pytest swaps the hooks in sys), and importing them
    there would load them into the caller."""
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import builtin_corpus as corpus; "
              "json.dump({name: corpus._docstrings_of_compiled(name) for name in sys.argv[2:]}, sys.stdout)")
    folder = str(Path(__file__).resolve().parent)
    result = subprocess.run([sys.executable, "-I", "-c", script, folder, *names], capture_output=True, check=True)
    return json.loads(result.stdout)


def _is_compiled(name: str) -> bool:
    if name in sys.builtin_module_names:
        return True
    spec = importlib.machinery.PathFinder.find_spec(name)
    return spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)


def corpus_sha256(documents: list[str]) -> str:
    """Hash of the documents with their boundaries (a NUL after each), so a different split changes it."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def builtin_documents() -> tuple[list[str], str]:
    """The built-in corpus as a list of documents, and its sha256."""
    from pydoc_data.topics import topics

    groups = [[topics[key]] for key in sorted(topics)]
    groups += _module_texts(Path(sysconfig.get_paths()["stdlib"]))
    seen, documents = set(), []
    for group in groups:
        kept = []
        for text in (t.strip() for t in group):
            if text and text not in seen:
                seen.add(text)
                kept.append(text)
        if kept:
            documents.append("\n\n".join(kept))
    return documents, corpus_sha256(documents)


def describe(documents: list[str], sha256: str) -> dict:
    """What a manifest records about the corpus: enough to tell whether another run used the same text."""
    return {
        "kind": "builtin",
        "documents": len(documents),
        "bytes": sum(len(doc.encode("utf-8")) for doc in documents),
        "sha256": sha256,
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": sys.platform,
    }


def main() -> None:
    stats = describe(*builtin_documents())
    print(" ".join(f"{key}:{value}" for key, value in stats.items()))
    if stats["bytes"] < MINIMUM_CORPUS_BYTES:
        print(f"warning: the corpus has only {stats['bytes']} bytes (expected at least {MINIMUM_CORPUS_BYTES}); "
              "this Python may ship without its library sources", file=sys.stderr)


if __name__ == "__main__":
    main()
