"""The embedded default corpus: English text that ships with every Python install, so `python train.py`
trains with no download.

It is made of the interpreter's documentation topics (`pydoc_data.topics`, the text `help("for")` prints:
about half a megabyte of reference prose) followed by the docstrings of a fixed list of standard-library
modules and their public classes and functions. The exact text depends a little on the Python version;
it is built the same way every time on one interpreter.
"""
import importlib
import inspect
import warnings

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
    """One document per module: its docstring and those of its public classes, functions and methods."""
    docs = []
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:          # a trimmed Python may lack a module; the corpus just gets shorter
            continue
        parts = [inspect.getdoc(module) or ""]
        with warnings.catch_warnings():            # some members warn when touched (deprecated aliases)
            warnings.simplefilter("ignore")
            parts += _member_docs(module)
        text = "\n\n".join(p for p in parts if p).strip()
        if text:
            docs.append(text)
    return docs


def _member_docs(module) -> list:
    """Docstrings of the module's own public classes and functions, in name order."""
    parts = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{name}\n{doc}")
    return parts


def default_corpus_documents() -> list:
    return documentation_topics() + module_docstrings()


def default_corpus_text() -> str:
    """All documents joined by blank lines (about 0.8 MB of English and code on Python 3.11)."""
    return "\n\n".join(default_corpus_documents()) + "\n"
