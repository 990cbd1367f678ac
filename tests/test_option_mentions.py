"""Every `--option` that a message (or the README) tells the user to pass is a real option of the command it
belongs to. Messages are found by scanning the string literals of the package; an option belongs to the
command named before it in the same string (`python data/prepare.py ... --out`), else to the command of the
file the string is in (train.py's settings for the training code)."""
import argparse
import ast
import dataclasses
import re
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nanogpt_np"
OPTION = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
PLACEHOLDERS = {"key"}                      # `--key=value` in a usage line
COMMAND_NAMES = [                           # how a string names a command, and which one
    ("train", r"\btrain\.py\b"),
    ("sample", r"\bsample\.py\b"),
    ("prepare", r"\bprepare(_\w+)?\.py\b|nanogpt_np\.data\.prepare\b"),
    ("serve", r"nanogpt_np\.serve\b"),
    ("evaluate", r"nanogpt_np\.eval\.evaluate\b"),
    ("bpe_cli", r"\bbpe_cli\b"),
    ("hf_gpt2", r"nanogpt_np\.io\.hf_gpt2\b"),
    ("plot", r"nanogpt_np\.plot\b"),
]
FILE_COMMANDS = {                           # the command a file's messages are shown by (default: train)
    "sample.py": "sample", "serve/": "serve", "eval/evaluate.py": "evaluate", "tokenizers/bpe_cli.py": "bpe_cli",
    "io/hf_gpt2.py": "hf_gpt2", "data/prepare.py": "prepare", "data/ingest.py": "prepare",
    "data/clean.py": "prepare", "data/dedup.py": "prepare", "data/shards.py": "prepare",
    "data/datasets.py": "prepare", "plot.py": "plot",
    "kernels/compile.py": None,             # its `--std=c++17` is a flag for the CUDA compiler, not for a user
}


def argparse_options(main, argv=()) -> set:
    """The --options of the argparse parser that `main` builds (sub-commands included), found by stopping
    main at its parse_args call."""
    parsers = []

    class Stop(Exception):
        pass

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        raise Stop
    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            main(list(argv))
        except Stop:
            pass
    options = set()
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            options.update(s[2:] for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return options


def command_options() -> dict:
    from nanogpt_np.config import TrainConfig
    from nanogpt_np.data import prepare
    from nanogpt_np.eval import evaluate
    from nanogpt_np import plot
    from nanogpt_np.io import hf_gpt2
    from nanogpt_np.sample import SampleConfig
    from nanogpt_np.serve import server
    from nanogpt_np.tokenizers import bpe_cli
    return {
        "train": {f.name for f in dataclasses.fields(TrainConfig)} | {"preset", "help"},
        "sample": {f.name for f in dataclasses.fields(SampleConfig)} | {"help"},
        "prepare": argparse_options(prepare.main),
        "serve": argparse_options(server.main),
        "evaluate": argparse_options(evaluate.main),
        "bpe_cli": argparse_options(bpe_cli.main),
        "hf_gpt2": argparse_options(hf_gpt2.main),
        "plot": argparse_options(plot.main),
    }


def mentions(text: str, default):
    """(command, option) for every --option in `text`; a command named in the text owns what follows it."""
    named = sorted((m.start(), command) for command, pattern in COMMAND_NAMES for m in re.finditer(pattern, text))
    for m in OPTION.finditer(text):
        before = [command for position, command in named if position < m.start()]
        yield (before[-1] if before else default), m.group(1)


def strings_of(path: Path):
    """The string literals of a Python file but its docstrings (prose about several commands at once, not
    messages); an f-string is one string, with {...} where its values go."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    inside_fstrings = set(docstrings)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inside_fstrings.update(id(v) for v in node.values)
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{...}" for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_fstrings:
            yield node.lineno, node.value


def file_command(path: Path):
    rel = path.relative_to(PACKAGE).as_posix()
    for prefix, command in FILE_COMMANDS.items():
        if rel == prefix or (prefix.endswith("/") and rel.startswith(prefix)):
            return command
    return "train"


def test_every_option_a_message_suggests_exists():
    options = command_options()
    assert {"dataset", "init_from", "overwrite"} <= options["train"] and "gpt2_dir" in options["prepare"]
    wrong, checked = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        default = file_command(path)
        for line, text in strings_of(path):
            for command, option in mentions(text, default):
                if command is None or option in PLACEHOLDERS:
                    continue
                checked += 1
                if option.replace("-", "_") not in {o.replace("-", "_") for o in options[command]}:
                    wrong.append(f"{path.relative_to(REPO)}:{line}: --{option} is not an option of {command}")
    assert checked > 100
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("doc", ["README.md", "data/README.md"])
def test_every_option_in_the_documented_commands_exists(doc):
    """In the READMEs, options that follow a command on the same line."""
    options = command_options()
    wrong = []
    for n, line in enumerate((REPO / doc).read_text(encoding="utf-8").splitlines(), 1):
        for command, option in mentions(line, None):
            if command is not None and option not in PLACEHOLDERS and option.replace("-", "_") not in {
                    o.replace("-", "_") for o in options[command]}:
                wrong.append(f"{doc}:{n}: --{option} is not an option of {command}")
    assert not wrong, "\n".join(wrong)


def test_the_scan_finds_a_wrong_suggestion():
    """The scanner itself: a made-up option is reported, a real one is not."""
    options = command_options()
    found = dict((o, c) for c, o in mentions("no files; pass --gpt2_dir DIR, or run python data/prepare.py "
                                             "--gpt2_dir DIR", "train"))
    assert list(mentions("pass --gpt2_dir DIR", "train")) == [("train", "gpt2_dir")]
    assert "gpt2_dir" not in options["train"] and found["gpt2_dir"] == "prepare"


def test_tokenizer_gpt2_without_its_files_suggests_real_ways(tmp_path, monkeypatch):
    """`--tokenizer=gpt2` with GPT-2's files nowhere: the message names an environment variable and a folder,
    not the prepare command's --gpt2_dir."""
    from nanogpt_np.config import parse_args
    from nanogpt_np.data import prepare
    from nanogpt_np.trainer import train
    monkeypatch.setenv("NANOGPT_GPT2_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(prepare.os.path, "isfile", lambda p: False)       # no encoder.json anywhere
    with pytest.raises(ValueError) as e:
        train(parse_args(["--tokenizer=gpt2", "--device=cpu", f"--out_dir={tmp_path / 'r'}"]), echo=lambda *a: None)
    assert "NANOGPT_GPT2_DIR" in str(e.value) and "--gpt2_dir" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="pass --gpt2_dir DIR"):
        prepare.find_gpt2_dir(option="--gpt2_dir")


def test_readme_training_commands_each_start_their_own_run_directory():
    """Run top to bottom, the README's `python train.py` commands must not collide: a new run refuses a
    folder that holds one, so every command that starts a run (no --resume, no --overwrite) names its own
    --out_dir (default: out), and every --resume names one that an earlier command started."""
    started = []
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        for command in re.findall(r"python train\.py[^`#&|]*", line):
            options = dict(m.group(1, 2) for m in re.finditer(r"--(\w+)(?:=(\S+))?", command))
            out_dir = options.get("out_dir") or "out"
            if "help" in options:
                continue
            if "resume" in options:
                assert out_dir in started, f"README: {command!r} resumes {out_dir}, which no command started"
            elif "overwrite" not in options:
                assert out_dir not in started, f"README: {command!r} would start a second run in {out_dir}"
                started.append(out_dir)
    assert len(started) >= 5
