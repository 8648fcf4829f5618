"""The results sections of the README and docs/organism.md quote only figures that the committed study report contains
(issue 12, item 6; issue 19, item 8)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "results" / "organism" / "report.md"
# Each file holds one results block: the README's headline and the full results in the organism's docs page.
QUOTING = ["README.md", "docs/organism.md"]
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")  # decimals such as 0.70 or 2.37; not 1.16 in "trl 1.16.x"


# further blocks: (marker, the committed report they quote)
BLOCKS = {
    "results:interventions": ROOT / "results" / "interventions" / "report.md",
    "results:svd": ROOT / "results" / "svd" / "report.md",
}


def results_section(text: str, marker: str = "results") -> str:
    start, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"the file must have one {marker} block"
    return text.split(start, 1)[1].split(end, 1)[0]


def unquoted(section: str, report: str) -> list[str]:
    """Decimal figures of `section` that do not occur in `report`."""
    have = set(NUMBER.findall(report))
    return sorted({x for x in NUMBER.findall(section) if x not in have})


@pytest.mark.parametrize("name", QUOTING)
def test_results_come_from_the_committed_report(name):
    section = results_section((ROOT / name).read_text(encoding="utf-8"))
    assert "results/organism/report.md" in section
    figures = NUMBER.findall(section)
    assert len(figures) >= 20, "the results section should quote the study's table"
    assert unquoted(section, REPORT.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("marker", sorted(BLOCKS))
def test_the_other_results_blocks_quote_their_own_report(marker):
    report = BLOCKS[marker]
    section = results_section((ROOT / "README.md").read_text(encoding="utf-8"), marker)
    assert str(report.relative_to(ROOT)) in section
    assert len(NUMBER.findall(section)) >= 10, "the block should quote its study's table"
    assert unquoted(section, report.read_text(encoding="utf-8")) == []


def test_a_figure_absent_from_the_report_is_caught():
    report = "| baseline | 0.70 [0.61, 0.77] |"
    assert unquoted("baseline deployed hack 0.70 [0.61, 0.77]", report) == []
    assert unquoted("baseline deployed hack 0.71 [0.61, 0.77]", report) == ["0.71"]


def test_published_plots_are_committed_beside_the_report():
    for name in ("curves.png", "tradeoff.png"):
        path = REPORT.parent / name
        assert path.is_file() and path.stat().st_size > 1000, path
