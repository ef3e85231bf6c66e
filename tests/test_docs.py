"""Every code block in the docs runs as written, and the docs link only to files that exist.

Files: README.md and every docs/*.md (found by glob, so a new doc is covered by itself).

- ```python blocks run in order in one namespace per file (like a notebook), in a fresh
  temporary directory (files the blocks write land there), with the test process's 8
  simulated CPU devices (tests/conftest.py). One test per file, so a failure names the
  doc; the message names the block's first line.
- ```bash blocks of docs/*.md: after the file's python blocks (so those can write the
  data files the commands read), every line that starts with ``jaxrl-llm`` (lines joined
  across trailing backslashes) runs as ``python -m jaxrl_llm.cli ...`` in the same
  directory, on ONE CPU device like a plain user's machine (the
  ``--xla_force_host_platform_device_count`` flag of the test session is not passed on).
  Other lines (pip install, export, srun, gcloud, comments) are not run. README's bash
  blocks are not run: its two commands (install, and the test command) are what CI runs
  itself, and its overview of the stages uses placeholder checkpoint paths.
- A block is skipped only when the line right above its opening fence is
  ``<!-- not run: <reason> -->`` with a non-empty reason (e.g. a multi-host launch).
  Keep these rare: a doc example that does not run is a doc example that rots.

Doc examples should be tiny so this stays fast: ``tiny:llama`` / ``CausalLM(tiny_config
("llama"), ...)``, the ``char`` tokenizer, ``run.total_steps=2``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import subprocess
import sys
import traceback
import types
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(Path(p) for p in glob.glob(str(ROOT / "docs" / "*.md")))]
DOC_IDS = [str(p.relative_to(ROOT)) for p in DOCS]

pytestmark = pytest.mark.slow  # trains tiny models (in process and from the CLI)

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run\s*:(?P<reason>.*?)-->\s*$")
NOT_RUN_LOOSE = re.compile(r"<!--\s*not[ -]run", re.IGNORECASE)
PYTHON_LANGS = {"python", "py", "python3"}
BASH_LANGS = {"bash", "sh", "shell", "console"}
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "2>&1"}
CLI_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown file."""

    lang: str  # first word of the info string, lower case ("" if none)
    start: int  # 1-based line number of the opening fence
    code: str  # the block's text, its indentation removed
    skip_reason: str | None  # reason of a `<!-- not run: ... -->` marker right above


def parse_blocks(text: str, name: str = "<doc>") -> list[Block]:
    """The fenced code blocks of a markdown text (``` or ~~~ fences, possibly indented).

    Raises:
      ValueError: a fence is never closed, or a ``not run`` marker is empty.
    """
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        start, body = i + 1, []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) and not close["info"].strip():
                break
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        else:
            raise ValueError(f"{name}:{start}: code block is never closed")
        i += 1
        reason = None
        above = lines[start - 2] if start >= 2 else ""
        marker = NOT_RUN.match(above)
        if marker:
            reason = marker["reason"].strip()
            if not reason:
                raise ValueError(f"{name}:{start - 1}: `<!-- not run: <reason> -->` needs a reason")
        blocks.append(Block(info.split()[0].lower() if info else "", start, "\n".join(body), reason))
    return blocks


def cli_commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line number, argv) of every line of a bash block that starts with ``jaxrl-llm``
    (continuation lines joined), with ``jaxrl-llm`` as ``python -m jaxrl_llm.cli``."""
    out, lines = [], block.code.splitlines()
    i = 0
    while i < len(lines):
        first = i
        line = lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        i += 1
        argv = shlex.split(line, comments=True)
        if not argv or argv[0] != "jaxrl-llm":
            continue
        lineno = block.start + 1 + first
        bad = [a for a in argv if a in SHELL_OPERATORS]
        if bad:
            raise ValueError(f"line {lineno}: shell operators {bad} in a `jaxrl-llm` line; the docs test runs "
                             "each such line as one command — put one command per line")
        out.append((lineno, [sys.executable, "-m", "jaxrl_llm.cli", *argv[1:]]))
    return out


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: one CPU device (the test session's simulated
    device count is dropped), the test session's compilation cache."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    return env


def _failure(doc: str, block: Block, what: str, detail: str) -> str:
    return f"{doc}: the {block.lang} block starting at line {block.start} {what}:\n{detail}"


@pytest.mark.parametrize("doc", DOC_IDS)
def test_code_blocks_run_as_written(doc, tmp_path, monkeypatch):
    path = ROOT / doc
    blocks = parse_blocks(path.read_text(encoding="utf-8"), doc)
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"_doc_{re.sub(r'[^0-9A-Za-z]', '_', doc)}")
    module.__file__ = str(tmp_path / "doc_blocks.py")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses etc. look the module up

    for block in blocks:
        if block.lang not in PYTHON_LANGS or block.skip_reason is not None:
            continue
        # Pad with newlines so tracebacks show the doc's own line numbers.
        code = compile("\n" * block.start + block.code, str(path), "exec")
        error = None
        try:
            exec(code, module.__dict__)  # noqa: S102 — running the docs' code is the point
        except (Exception, SystemExit):  # noqa: BLE001  # SystemExit: e.g. a CLI entry point called from a block
            error = traceback.format_exc(limit=-8)
        if error is not None:
            pytest.fail(_failure(doc, block, "raised", error), pytrace=False)

    if path.parent != ROOT / "docs":
        return  # README's bash blocks: the install and test commands CI runs itself
    env = cli_env()
    for block in blocks:
        if block.lang not in BASH_LANGS or block.skip_reason is not None:
            continue
        try:
            commands = cli_commands(block)
        except ValueError as err:
            pytest.fail(_failure(doc, block, "has a line the test cannot run", str(err)), pytrace=False)
        for lineno, argv in commands:
            proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=CLI_TIMEOUT_S, check=False)
            if proc.returncode != 0:
                command = shlex.join(["jaxrl-llm", *argv[3:]])
                pytest.fail(_failure(doc, block, f"failed on line {lineno} (exit {proc.returncode})",
                                     f"$ {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"), pytrace=False)


def test_not_run_markers_have_a_reason_and_sit_on_a_fence():
    problems = []
    for doc in DOC_IDS:
        lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not NOT_RUN_LOOSE.search(line):
                continue
            m = NOT_RUN.match(line)
            if not m or not m["reason"].strip():
                problems.append(f"{doc}:{i + 1}: write the marker as `<!-- not run: <reason> -->`: {line.strip()!r}")
            elif i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
                problems.append(f"{doc}:{i + 1}: a `not run` marker must be the line right above a code fence")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
TOP_LEVEL = ("jaxrl_llm", "docs", "tests", "experiments", "benchmarks", "notebooks")  # tracked folders
# `docs/data.md`, `tests/train/test_grpo.py::test_x`, `tests/parallel/test_mesh_*.py`: a
# path under one of the repository's top-level folders, in backticks.
_TOP = "|".join(TOP_LEVEL)
MENTION = re.compile(rf"`(?P<path>(?:{_TOP})/[^`\s:]*[A-Za-z0-9_*](?:\.[A-Za-z0-9]+))(?:::(?P<test>[A-Za-z_]\w*))?`")


def _outside_repo(target: Path) -> bool:
    try:
        rel = target.resolve().relative_to(ROOT)
    except ValueError:
        return True
    return rel.parts[:1] == ("shared",)


def _strip_code(text: str) -> str:
    """The text without fenced code blocks (their contents are code, not links)."""
    out, inside = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and (inside is None or (m["fence"][0] == inside[0] and len(m["fence"]) >= len(inside)
                                     and not m["info"].strip())):
            inside = m["fence"] if inside is None else None
            out.append("")
            continue
        out.append("" if inside else line)
    return "\n".join(out)


@pytest.mark.parametrize("doc", DOC_IDS)
def test_docs_link_only_to_files_in_the_repository(doc):
    path = ROOT / doc
    text = _strip_code(path.read_text(encoding="utf-8"))
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if "../shared" in line or re.search(r"(^|[\s`(])shared/", line):
            problems.append(f"{doc}:{lineno}: points into shared/, which is not part of the repository")
        for m in LINK.finditer(line):
            target = m["target"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # https:, mailto:, in-page anchors
            file_part = target.split("#", 1)[0]
            resolved = (path.parent / file_part) if not file_part.startswith("/") else Path(file_part)
            if _outside_repo(resolved):
                problems.append(f"{doc}:{lineno}: link {target!r} leaves the repository")
            elif not resolved.exists():
                problems.append(f"{doc}:{lineno}: link {target!r} names a missing file")
        for m in MENTION.finditer(line):
            rel, test = m["path"], m["test"]
            matches = sorted(ROOT.glob(rel)) if "*" in rel else [ROOT / rel]
            if not matches or not all(p.exists() for p in matches):
                problems.append(f"{doc}:{lineno}: `{rel}` does not exist")
            elif test and not any(re.search(rf"^\s*(async\s+)?def {test}\b", p.read_text(encoding="utf-8"), re.MULTILINE)
                                  for p in matches):
                problems.append(f"{doc}:{lineno}: `{rel}` has no test `{test}`")
    assert not problems, "\n".join(problems)


def test_the_parser_finds_fences_markers_and_cli_lines():
    text = "\n".join([
        "intro",
        "```python",
        "x = 1",
        "```",
        "<!-- not run: needs 2 hosts -->",
        "```bash",
        "jaxrl-llm sft --policy tiny:llama \\",
        "    --tokenizer char   # comment",
        "pip install -e .",
        "```",
        "  ```bash",
        "  jaxrl-llm demo",
        "  ```",
    ])
    blocks = parse_blocks(text)
    assert [(b.lang, b.start, b.skip_reason) for b in blocks] == [
        ("python", 2, None), ("bash", 6, "needs 2 hosts"), ("bash", 11, None)]
    assert blocks[0].code == "x = 1"
    (lineno, argv), = cli_commands(blocks[1])
    assert lineno == 7 and argv[1:] == ["-m", "jaxrl_llm.cli", "sft", "--policy", "tiny:llama", "--tokenizer", "char"]
    assert cli_commands(blocks[2])[0][1][3:] == ["demo"]
    with pytest.raises(ValueError, match="needs a reason"):
        parse_blocks("<!-- not run: -->\n```bash\nx\n```")
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks("```python\nx = 1\n")
