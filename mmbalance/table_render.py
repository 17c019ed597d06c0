"""Text of the tables: the per-format tokens (GitHub markdown or LaTeX) and the two table writers.

Every cell is composed from plain text and the tokens of one :class:`Style`, so a LaTeX table holds
only ASCII (``$\\pm$``, ``$^\\dagger$``, ``\\textbf{..}``, ...) and compiles with ``booktabs``
alone, while the GitHub table keeps the Unicode signs and stays readable in a terminal.

* GitHub: ``tabulate``'s ``github`` format; best of a column ``**bold**``, second ``_italic_``
  (markdown has no underline; ``<ins>`` would widen every column by 11 characters).
* LaTeX: a ``table`` float with a ``booktabs`` tabular (``\\toprule``, ``\\midrule``,
  ``\\bottomrule``); best ``\\textbf``, second ``\\underline``; with several datasets in one table a
  second header line spans each dataset's columns (``\\multicolumn`` and ``\\cmidrule``). Needs
  ``\\usepackage{booktabs}`` in the preamble.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tabulate import tabulate

from mmbalance.results import Stat

__all__ = ["Style", "STYLES", "latex_escape", "format_stat", "render_table"]


_LATEX_TEXT = {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",  # in text mode with the default OT1 encoding < > | print other glyphs
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "[": "{[}",  # a [ after \\ would be read as the row's optional argument
    "]": "{]}",
    **{ch: "\\" + ch for ch in "&%_#${}"},
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials in plain text (names of methods, datasets and metrics; notes)."""
    text = text.replace(">=", "\x00ge").replace("<=", "\x00le")
    out = "".join(_LATEX_TEXT.get(ch, ch) for ch in text)
    return out.replace("\x00ge", r"$\geq$").replace("\x00le", r"$\leq$")


@dataclass(frozen=True)
class Style:
    """The tokens of one output format."""

    name: str
    pm: str
    up: str
    down: str
    delta: str
    dagger: str  # Δ not significant
    ddagger: str  # below the best single-modality row
    equiv: str
    bold_open: str
    bold_close: str
    second_open: str
    second_close: str
    second_word: str  # how the caption names the second-best marking

    def text(self, plain: str) -> str:
        """Plain text made safe for this format."""
        return latex_escape(plain) if self.name == "latex" else plain

    def arrow(self, higher_is_better: bool | None) -> str:
        if higher_is_better is None:
            return ""
        return " " + (self.up if higher_is_better else self.down)

    def best(self, cell: str) -> str:
        return f"{self.bold_open}{cell}{self.bold_close}"

    def second(self, cell: str) -> str:
        return f"{self.second_open}{cell}{self.second_close}"

    def signed(self, value: float, decimals: int) -> str:
        """``+1.23`` / ``-1.23`` (LaTeX: a real minus sign)."""
        if math.isnan(value):
            return "nan"
        text = f"{value:+.{decimals}f}"
        if self.name == "latex":
            return f"${text[0]}${text[1:]}"
        return text


STYLES = {
    "github": Style(
        "github", "±", "↑", "↓", "Δ", "†", "‡", "≡", "**", "**", "_", "_", "italic",
    ),
    "latex": Style(
        "latex", r"$\pm$", r"$\uparrow$", r"$\downarrow$", r"$\Delta$", r"$^\dagger$", r"$^\ddagger$",
        r"$\equiv$", r"\textbf{", "}", r"\underline{", "}", "underlined",
    ),
}


def _num(value: float, decimals: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{decimals}f}"


def format_stat(stat: Stat, *, scale: float, decimals: int, style: Style) -> str:
    """``mean ± std (n)``; with one value ``mean (1)``."""
    text = _num(stat.mean * scale, decimals)
    if stat.std is not None:
        text += f" {style.pm} " + _num(stat.std * scale, decimals)
    return f"{text} ({stat.n})"


def _github(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    align = ("left",) + ("right",) * (len(header) - 1)
    return tabulate(body, headers=list(header), tablefmt="github", disable_numparse=True, colalign=align)


def _latex(header: Sequence[str], body: Sequence[Sequence[str]], groups: Sequence[tuple[str, int]]) -> str:
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule"]
    if groups:
        spans, rules, col = [""], [], 2
        for title, width in groups:
            spans.append(rf"\multicolumn{{{width}}}{{c}}{{{title}}}")
            rules.append(rf"\cmidrule(lr){{{col}-{col + width - 1}}}")
            col += width
        lines += [" & ".join(spans) + r" \\", " ".join(rules)]
    lines += [" & ".join(header) + r" \\", r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def render_table(
    header: Sequence[str],
    body: Sequence[Sequence[str]],
    style: Style,
    caption: str,
    groups: Sequence[tuple[str, int]] = (),
) -> str:
    """One table with its caption. Cells and caption are already in ``style``'s tokens.

    Args:
        groups: LaTeX only: ``(title, number of columns)`` spanning the columns after the first.
    """
    if style.name == "latex":
        tab = _latex(header, body, groups)
        return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}", tab, r"\end{table}"])
    return f"{caption}\n\n{_github(header, body)}"
