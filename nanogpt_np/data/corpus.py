"""The embedded default corpus: English text that ships with every Python install, so `python train.py`
trains with no download.

It is made of the interpreter's documentation topics (`pydoc_data.topics`, the text `help("for")` prints:
about half a megabyte of reference prose) followed by the docstrings of a fixed list of standard-library
modules and their public classes and functions. The exact text depends a little on the Python version;
it is built the same way every time on one interpreter.
"""
import ast
import importlib
import inspect

# Pure-Python standard-library modules with good prose docstrings and no import-time side effects.
DOC_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
    "fractions", "functools", "glob", "gzip", "heapq", "hashlib", "html", "http.client", "http.server",
    "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "mimetypes",
    "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile",
)


def documentation_topics() -> list:
    """The reference topics help() shows, one document per topic, in sorted order."""
    from pydoc_data.topics import topics
    return [topics[name].strip() for name in sorted(topics)]


def module_docstrings(module_names=DOC_MODULES) -> list:
    """One document per module: its docstring and those of its public top-level classes and functions.

    The docstrings are read from the module's source file (with `ast`), not from the live module object:
    other libraries sometimes replace stdlib functions at import time (one patches inspect.getfile), and the
    corpus must not depend on what else happens to be imported."""
    docs = []
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
            path = inspect.getsourcefile(module)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (ImportError, OSError, TypeError, SyntaxError, UnicodeDecodeError):
            continue          # a trimmed Python may lack a module or its source: the corpus just gets shorter
        parts = [ast.get_docstring(tree) or ""]
        members = [node for node in tree.body
                   if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                   and not node.name.startswith("_")]
        for node in sorted(members, key=lambda n: n.name):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(f"{node.name}\n{doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if text:
            docs.append(text)
    return docs


def default_corpus_documents() -> list:
    return documentation_topics() + module_docstrings()


def default_corpus_text() -> str:
    """All documents joined by blank lines (about 0.77 MB of English and code on Python 3.11)."""
    return "\n\n".join(default_corpus_documents()) + "\n"
