"""Regenerate ``data/sample/``: a small corpus in The Pile's jsonl.zst format plus a BPE
tokenizer trained on it, for the CPU "main job" and for trying data_prep end to end.

The text comes from the Python standard library of the interpreter running this script
(PSF License; see ``data/sample/README.md``), in three subsets (``meta.pile_set_name``):

* ``StdlibDocs``  - an API reference per module rendered from its docstrings (read with
  ``ast``; nothing is imported, so no module side effects run),
* ``PythonDocsTopics`` - the documentation topics shipped in ``pydoc_data.topics``,
* ``StdlibCode``  - module sources, a seeded random selection up to ``--code-chars``.

Modules that carry third-party permission notices (as opposed to the PSF licence) are left
out. Output is deterministic for a given Python version::

    python -m megatron_blackmamba.data_prep.make_sample_corpus            # writes data/sample/
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import sys
import sysconfig
import textwrap
from typing import Dict, Iterator, List, Tuple

from .fileio import AtomicFile
from .sample import SAMPLE_DIR
from .tokenizer import load_tokenizer, train_bpe_tokenizer

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "tkinter",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",
    "pydoc_data",
    "lib-dynload",
}
_THIRD_PARTY_NOTICE = "permission to use, copy, modify"
_SEED = 20240201
_FILES = 2


def stdlib_modules(stdlib: str) -> Iterator[Tuple[str, str]]:
    """(dotted module name, source) of eligible stdlib modules, sorted by path."""
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                source = f.read()
            if _THIRD_PARTY_NOTICE in source.lower():
                continue
            module = os.path.relpath(path, stdlib)[: -len(".py")].replace(os.sep, ".")
            yield module.removesuffix(".__init__"), source


def render_module_docs(module: str, source: str) -> str:
    """A pydoc-like plain-text reference of a module's public, documented API ('' if none)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    sections: List[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        sections.append("DESCRIPTION\n" + _indent(doc, 1))
    classes = [
        _render_class(node)
        for node in tree.body
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_")
    ]
    classes = [c for c in classes if c]
    if classes:
        sections.append("CLASSES\n" + "\n\n".join(classes))
    functions = [_render_function(node, 1) for node in tree.body if _documented_function(node)]
    if functions:
        sections.append("FUNCTIONS\n" + "\n\n".join(functions))
    if not sections:
        return ""
    summary = f" - {doc.splitlines()[0]}" if doc else ""
    return f"Help on module {module}:\n\nNAME\n    {module}{summary}\n\n" + "\n\n".join(sections)


def _documented_function(node: ast.AST) -> bool:
    return (
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (not node.name.startswith("_") or node.name == "__init__")
        and ast.get_docstring(node) is not None
    )


def _render_class(node: ast.ClassDef) -> str:
    doc = ast.get_docstring(node)
    methods = [_render_function(item, 2) for item in node.body if _documented_function(item)]
    if not doc and not methods:
        return ""
    bases = ", ".join(ast.unparse(base) for base in node.bases)
    lines = [f"    class {node.name}" + (f"({bases})" if bases else "")]
    if doc:
        lines.append(_indent(doc, 2))
    if methods:
        lines.append("\n" + "\n\n".join(methods))
    return "\n".join(lines)


def _render_function(node: ast.AST, level: int) -> str:
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    prefix = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
    signature = f"{prefix}{node.name}({ast.unparse(node.args)})"
    return _indent(signature, level) + "\n" + _indent(ast.get_docstring(node) or "", level + 1)


def _indent(text: str, level: int) -> str:
    return textwrap.indent(text, "    " * level)


def python_doc_topics() -> List[Tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics) if topics[name].strip()]


def collect_documents(code_chars: int) -> List[Dict[str, object]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    modules = list(stdlib_modules(stdlib))
    documents = []
    for module, source in modules:
        docs = render_module_docs(module, source)
        if docs:
            documents.append(_record(docs, "StdlibDocs"))
    documents.extend(_record(text, "PythonDocsTopics") for _, text in python_doc_topics())
    rng = random.Random(_SEED)
    rng.shuffle(modules)
    budget = code_chars
    for _, source in modules:
        if source.strip() and len(source) <= budget:
            documents.append(_record(source, "StdlibCode"))
            budget -= len(source)
    rng.shuffle(documents)
    return documents


def _record(text: str, subset: str) -> Dict[str, object]:
    return {"text": text, "meta": {"pile_set_name": subset}}


def write_pile_jsonl_zst(path: str, records: List[Dict[str, object]]) -> None:
    import zstandard

    payload = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    with AtomicFile(path) as f:
        f.write(zstandard.ZstdCompressor(level=19).compress(payload))


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default=str(SAMPLE_DIR))
    parser.add_argument(
        "--code-chars",
        type=int,
        default=5_000_000,
        help="characters of module source to include (default %(default)s)",
    )
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args(argv)

    os.makedirs(args.output_dir, exist_ok=True)
    documents = collect_documents(args.code_chars)
    per_file = -(-len(documents) // _FILES)
    for index in range(_FILES):
        chunk = documents[index * per_file : (index + 1) * per_file]
        write_pile_jsonl_zst(os.path.join(args.output_dir, f"{index:02d}.jsonl.zst"), chunk)
    tokenizer_path = os.path.join(args.output_dir, "tokenizer.json")
    texts = [str(d["text"]) for d in documents]
    train_bpe_tokenizer(texts, args.vocab_size, tokenizer_path)
    license_path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    shutil.copyfile(license_path, os.path.join(args.output_dir, "LICENSE-PSF.txt"))

    tokenizer = load_tokenizer(tokenizer_path)
    counts: Dict[str, List[int]] = {}
    for doc, ids in zip(documents, tokenizer.encode_documents(texts)):
        subset = str(doc["meta"]["pile_set_name"])  # type: ignore[index]
        entry = counts.setdefault(subset, [0, 0, 0])
        entry[0] += 1
        entry[1] += len(str(doc["text"]))
        entry[2] += len(ids)
    print(f"Python {sys.version.split()[0]}, stdlib at {sysconfig.get_paths()['stdlib']}")
    for subset, (docs, chars, tokens) in sorted(counts.items()):
        print(f"{subset:18s} {docs:6d} docs {chars:10,d} chars {tokens:10,d} tokens")
    for name in sorted(os.listdir(args.output_dir)):
        print(f"{name:18s} {os.path.getsize(os.path.join(args.output_dir, name)):10,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
