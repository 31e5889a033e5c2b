"""The README and the pages under docs/: every relative link and picture points to a file in the repository,
every #anchor names a heading of its target (GitHub's slugs), and every table row has its header's number of
cells. Reads Markdown only: no network, no JAX."""
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def split_fences(text: str):
    """([(line number, line) outside fenced code blocks], the line of a fence never closed, or None)."""
    prose, fence, opened = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence, opened = m.group(1), number
            elif m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line[m.end():].strip():
                fence = None
            continue
        if fence is None:
            prose.append((number, line))
    return prose, (opened if fence is not None else None)


def prose_lines(text: str):
    return split_fences(text)[0]


def unclosed_fence(text: str):
    return split_fences(text)[1]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lowercased, with everything but letters, numbers,
    marks, spaces, '-' and '_' dropped, and spaces turned into '-'."""
    text = CODE_SPAN.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", text)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"(\*{1,3})(.+?)\1", r"\2", text)  # emphasis
    kept = "".join(c for c in text.lower().strip()
                   if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in `page`; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path):
    """(line number, target) of every link and picture in `page`'s prose (not in code)."""
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        m = REFERENCE.match(line)
        if m:
            yield number, m.group(1)
            continue
        for m in LINK.finditer(CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line)):
            yield number, m.group(1)


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    assert "README.md" in names and len(PAGES) > 1, names


def test_slugs_follow_github():
    assert slug("Samplers and steps") == "samplers-and-steps"
    assert slug("COCOEE: the paper's Table 1 as the original computes it") == \
        "cocoee-the-papers-table-1-as-the-original-computes-it"
    assert slug("Single files: the original release's `model.ckpt`, SD v1 files, and back") == \
        "single-files-the-original-releases-modelckpt-sd-v1-files-and-back"
    assert slug("On paper: the paper's batch (64) on 8×H100 and on a v5p-64") == \
        "on-paper-the-papers-batch-64-on-8h100-and-on-a-v5p-64"
    assert slug("Größe und Ümlaute — 64² snake_case") == "größe-und-ümlaute--64²-snake_case"
    assert slug("The `edit` endpoint, [linked](x.md)") == "the-edit-endpoint-linked"


def test_anchors_of_repeated_headings(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n## Notes\n```\n## Not a heading\n```\n## Notes\n### Notes ###\n")
    assert anchors(page) == {"title", "notes", "notes-1", "notes-2"}


def test_links_outside_code(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("See [a](a.md#x) and ![b](img/b.png \"B\"), not `[c](c.md)`.\n```\n[d](d.md)\n```\n"
                    "[ref]: ../e.md\n[`f`](f.md) [g [h]](g.md)\n")
    assert [t for _, t in links(page)] == ["a.md#x", "img/b.png", "../e.md", "f.md", "g.md"]


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with `page`'s relative links and pictures, one line each."""
    problems = []
    for number, target in links(page):
        where = f"{page.relative_to(root)}:{number}: {target}"
        if not target or EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        try:
            file.relative_to(root)
        except ValueError:
            problems.append(f"{where}: outside the repository")
            continue
        if not file.exists():
            problems.append(f"{where}: no such file")
        elif anchor and file.suffix != ".md":
            problems.append(f"{where}: an anchor into a file that is not Markdown")
        elif anchor and anchor not in anchors(file):
            problems.append(f"{where}: no heading with this anchor in {file.relative_to(root)}")
    return problems


def test_broken_links_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n## Samplers and steps\n")
    (tmp_path / "docs" / "pic.png").write_bytes(b"")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#samplers-and-steps) ![ok](docs/pic.png) [ok](#a-readme) [ok](https://x.org/#y)\n"
                    "# A README\n[1](docs/b.md) [2](docs/a.md#samplers) [3](#nowhere) [4](docs/pic.png#x) [5](../x.md)\n")
    found = link_problems(page, tmp_path)
    assert [p.split(": ")[1] for p in found] == ["docs/b.md", "docs/a.md#samplers", "#nowhere", "docs/pic.png#x",
                                                  "../x.md"], found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_pictures_resolve(page):
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_are_closed(page):
    """An unclosed fence turns the rest of the page into code, and its links and headings into text."""
    assert unclosed_fence(page.read_text(encoding="utf-8")) is None, \
        f"{page.relative_to(ROOT)}:{unclosed_fence(page.read_text(encoding='utf-8'))}: a code block never closed"


def cells(row: str) -> int:
    """Cells of a table row as GitHub splits it: on every '|' not escaped, code spans included."""
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return len(re.split(r"(?<!\\)\|", row))


def table_problems(text: str) -> list[str]:
    """Table rows whose number of cells is not their header's, as 'line: found, wanted'."""
    problems = []
    lines = prose_lines(text)
    for i in range(1, len(lines)):
        (_, header), (_, rule) = lines[i - 1], lines[i]
        if "|" not in header or not re.fullmatch(r"\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*", rule):
            continue
        want = cells(header)
        for j in range(i + 1, len(lines)):
            n, row = lines[j]
            if n != lines[j - 1][0] + 1 or "|" not in row or not row.strip():
                break
            if cells(row) != want:
                problems.append(f"{n}: {cells(row)} cells, the header has {want}")
    return problems


def test_a_bare_pipe_in_a_table_is_found():
    table = "| part | state |\n|---|---|\n| `a\\|b` | done |\n| `train.py mode=vae|tower` | done |\n\nafter | it\n"
    assert table_problems(table) == ["4: 3 cells, the header has 2"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_table_rows_have_the_header_s_cells(page):
    problems = table_problems(page.read_text(encoding="utf-8"))
    assert not problems, "\n".join(f"{page.relative_to(ROOT)}:{p}" for p in problems)
