"""The documentation's links resolve, and the README still opens with the commands CI runs.

Every relative link in README.md and docs/*.md, Markdown `[text](target)` and `![alt](target)` (and
reference definitions `[name]: target`), must name a file or folder that exists, relative to the
page. An anchor into a Markdown page (`page.md#section`, or `#section` within the page) must match
one of its headings under GitHub's rule: the heading's text as rendered (code spans, emphasis and
links reduced to their text), lowercased, every character that is not a letter, digit, space,
hyphen or underscore dropped, spaces turned into hyphens, and a repeated heading suffixed -1, -2, ...
Links inside code (fenced blocks and `code spans`) are not links. External links (http, https,
mailto) are not checked: no network here. It reads files only (no torch), so it takes milliseconds.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
# [text](target "title") or ![alt](target); the text may hold one level of brackets ([`x[0]`](...)).
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)=\"([^\"]+)\"", re.I)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text with fenced code blocks and code spans blanked (their lines kept, for line numbers)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's Markdown text."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)  # `code` -> code
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters, digits and underscore, Unicode included
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown page defines: its headings' slugs (repeats numbered) and HTML anchors."""
    text = path.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    out = set(HTML_ANCHOR.findall(text))
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link on a page, outside code."""
    text = prose(path.read_text(encoding="utf-8"))
    found = []
    for pattern in (INLINE_LINK, REFERENCE_DEF):
        for m in pattern.finditer(text):
            found.append((m.start(), text.count("\n", 0, m.start()) + 1, m.group(1).strip("<>")))
    return [(line, target) for _, line, target in sorted(found)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each relative link on a page, as 'page:line: target: why' (paths from root)."""
    problems = []
    for line, target in links(path):
        if EXTERNAL.match(target):
            continue
        where, _, anchor = target.partition("#")
        dest = (path.parent / unquote(where)).resolve() if where else path
        why = None
        if not dest.exists():
            why = "no such file"
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            why = f"no heading with the anchor #{anchor} in {dest.relative_to(root)}"
        if why:
            problems.append(f"{path.relative_to(root)}:{line}: {target}: {why}")
    return problems


def test_every_relative_link_resolves():
    problems = [p for page in pages() for p in broken_links(page)]
    assert not problems, f"{len(problems)} broken link(s):\n  " + "\n  ".join(problems)


def test_the_pages_link_to_each_other():
    """Not vacuous: the README reaches every docs page, and the checker saw links with anchors."""
    targets = {t.partition("#")[0] for _, t in links(README)}
    missing = [p.relative_to(ROOT).as_posix() for p in pages()[1:] if p.relative_to(ROOT).as_posix() not in targets]
    assert not missing, f"README.md links to none of: {missing}"
    assert any("#" in t for page in pages() for _, t in links(page))


def test_the_checker_catches_what_it_should(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    (tmp_path / "other.md").write_text(
        "# Other\n\n## The `dd.load_model(\"x\")` call, again!\n\n## Repeat\n\n## Repeat\n")
    page.write_text(
        "# Page\n\n"
        "[ok](../other.md) [ok](../other.md#the-ddload_modelx-call-again) [ok](../other.md#repeat-1)\n"
        "[ok](#page) [ok](https://example.com/missing) ![ok](../other.md \"a title\")\n"
        "[bad](../missing.md) [bad](../other.md#nowhere) [bad](#nowhere) [bad][ref]\n"
        "`[not a link](missing.md)`\n"
        "```\n[not a link](missing.md)\n```\n\n"
        "[ref]: gone.png\n")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "../missing.md: no such file",
        "../other.md#nowhere: no heading with the anchor #nowhere in other.md",
        "#nowhere: no heading with the anchor #nowhere in docs/page.md",
        "gone.png: no such file",
    ], problems
    assert [p.split(":")[1] for p in problems] == ["5", "5", "5", "11"]


def test_readme_opens_with_the_two_commands_ci_runs():
    """The first code block after the title is the set-up-and-sample command and the test command, and
    the test command is the one .ci/run runs (the two are kept in step)."""
    text = README.read_text(encoding="utf-8")
    block = FENCE.search(text).group(0)
    assert "## " not in text[: text.index(block)], "a section comes before the two commands"
    commands = [line for line in block.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and "ddim-fast sample" in commands[0], block
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_test = re.search(r"^python -m pytest .*$", ci, re.M).group(0)
    assert commands[1].endswith(ci_test), (commands[1], ci_test)
    for pin in ("torch==2.13.0", '".[dev]"'):
        assert pin in commands[1] and pin in ci, pin


def test_the_gpu_suite_page_gives_commands_the_suite_takes():
    """docs/gpu-suite.md's commands name benchmarks.gpu_suite's real options (read from its source)."""
    page = (ROOT / "docs" / "gpu-suite.md").read_text(encoding="utf-8")
    assert 'PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m benchmarks.gpu_suite --budget 540 --out "$OUT"' in page
    source = (ROOT / "benchmarks" / "gpu_suite.py").read_text(encoding="utf-8")
    used = set(re.findall(r"benchmarks\.gpu_suite((?: --?[\w-]+(?: [^\s-][^\s]*)?)+)", page))
    options = {opt for cmd in used for opt in re.findall(r"--[\w-]+", cmd)}
    assert {"--budget", "--out", "--dry-run", "--quick"} <= options, options
    unknown = sorted(opt for opt in options if f'"{opt}"' not in source)
    assert not unknown, f"docs/gpu-suite.md uses options benchmarks/gpu_suite.py does not define: {unknown}"
