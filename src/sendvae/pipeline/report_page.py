"""A pipeline report as one self-contained HTML page (images inlined as base64 PNG) and a Markdown twin.

    page = Page("sendvae demo")
    page.text("What ran ...")
    page.figure(Path("recon.png"), "Reconstructions", "made by: sendvae demo (stage vae)")
    page.table(["metric", "value"], [["FD", "12.3"]], "Metrics")
    page.write(out / "report.html", out / "report.md")

The HTML needs nothing beside it (it can be mailed or attached to an issue); the Markdown refers to the
PNGs by their path relative to the report, so it renders on a code host next to the files.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from ..runtime.checkpoint import atomic_write_bytes

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: .92em; color: #444; margin-top: .3em; }
figcaption code, p code, li code { background: #f4f4f4; padding: 0 .25em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .93em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
.note { color: #555; font-size: .92em; }
"""


def _cell(text: str) -> str:
    """A table cell; numbers (and 'mean +- std') right-aligned."""
    head = text.split(" +- ")[0].rstrip("%")
    try:
        float(head)
    except ValueError:
        return f"<td>{_inline(text)}</td>"
    return f"<td class='num'>{_inline(text)}</td>"


def _inline(text: str) -> str:
    """Escape, then `code` spans (the only Markdown the page's prose uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _md(text: str, cell: bool = False) -> str:
    """The same text for Markdown: outside `code` spans, HTML's special characters as entities (a path
    like runs/<b>x</b> stays text, as the HTML page shows it); in a table cell also `|` escaped."""
    parts = text.split("`")
    out = [p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts)]
    joined = "`".join(out)
    return joined.replace("|", "\\|") if cell else joined


class Page:
    """Blocks of a report, rendered to HTML and Markdown."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[tuple[str, tuple]] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", (text,)))

    def text(self, text: str, note: bool = False) -> None:
        """A paragraph; `code` spans allowed; lines starting with '- ' make a list."""
        self.blocks.append(("p", (text, note)))

    def figure(self, path: Path, caption: str, made_by: str) -> None:
        """A PNG with what it shows and which command made it."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"report figure {path} was not written")
        self.blocks.append(("fig", (Path(path), caption, made_by)))

    def table(self, header: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.blocks.append(("table", (header, rows, caption)))

    # ---------------------------------------------------------------------------------------------------
    def _html(self) -> str:
        out = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>",
        ]
        for kind, args in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{html.escape(args[0])}</h2>")
            elif kind == "p":
                text, note = args
                lines = text.split("\n")
                if all(line.startswith("- ") for line in lines):
                    out.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines) + "</ul>")
                else:
                    cls = " class='note'" if note else ""
                    out.append(f"<p{cls}>{_inline(text)}</p>")
            elif kind == "fig":
                path, caption, made_by = args
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(
                    f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                    f"<figcaption><b>{_inline(caption)}</b><br>Made by: {_inline(made_by)}"
                    "</figcaption></figure>"
                )
            else:
                header, rows, caption = args
                cap = f"<caption>{_inline(caption)}</caption>" if caption else ""
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
                out.append(f"<table>{cap}<tr>{head}</tr>{body}</table>")
        out.append("</body></html>")
        return "\n".join(out)

    def _markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, args in self.blocks:
            if kind == "h2":
                out += [f"## {_md(args[0])}", ""]
            elif kind == "p":
                out += [f"_{_md(args[0])}_" if args[1] else _md(args[0]), ""]
            elif kind == "fig":
                path, caption, made_by = args
                rel = Path(os.path.relpath(path, base)).as_posix()
                out += [f"![{_md(caption)}]({rel})", "", f"**{_md(caption)}** Made by: {_md(made_by)}", ""]
            else:
                header, rows, caption = args
                if caption:
                    out += [f"**{_md(caption)}**", ""]
                out.append("| " + " | ".join(_md(h, cell=True) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(_md(c, cell=True) for c in r) + " |" for r in rows]
                out.append("")
        return "\n".join(out)

    def write(self, html_path: Path, md_path: Path) -> None:

        atomic_write_bytes(html_path, lambda f: f.write(self._html().encode()))
        atomic_write_bytes(md_path, lambda f: f.write(self._markdown(md_path.parent).encode()))
