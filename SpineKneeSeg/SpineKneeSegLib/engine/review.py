"""A cohort's review page (OUT/review.html): every case of summary.tsv on one page, the cases to look
at first (failed, not run, finished with warnings), each with its headline findings and its overlay
pictures, so that a reader checks hundreds of results by scrolling instead of opening each folder.
Static HTML with paths relative to the output folder: it moves with the folder and opens from a
file share."""
from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

from SpineKneeSegLib.core.atomic import write_text_atomic

REVIEW_PAGE = "review.html"
THUMBNAIL_PX = 180  # the pictures' shown height; each links to the full picture

# the order a reader should look in: results that need a decision before those that do not
_ATTENTION = {"failed": 0, "pending": 1, "flagged": 2, "busy": 3, "ok": 4, "skipped": 4}

_STYLE = """body{font-family:sans-serif;margin:1em;background:#111;color:#ddd}
table{border-collapse:collapse}td,th{border-bottom:1px solid #444;padding:4px 8px;vertical-align:top;text-align:left}
a{color:#8cf}img{height:%dpx;margin:0 4px 4px 0;background:#000}
.failed,.pending{color:#f77}.flagged{color:#fc6}.ok,.skipped{color:#8d8}.busy{color:#aaa}
.note{max-width:40em}.findings{white-space:nowrap}""" % THUMBNAIL_PX


def _href(output: Path, path: Path) -> str:
    return quote(os.path.relpath(path, output).replace(os.sep, "/"))


def _standing(row: tuple) -> str:
    """The row's status, "flagged" for a finished case with warnings."""
    return "flagged" if row[1] in ("ok", "skipped") and row[7] else row[1]


def findings(report: dict) -> list[str]:
    """The case's headline findings, "what: value", from its report by its task card's ``headline``
    (a structure not found is in its warnings already: "no voxels predicted for ...")."""
    from SpineKneeSegLib.engine.cards import load_tasks

    if not isinstance(report, dict):
        return []
    card, summaries = load_tasks().get(str(report.get("task"))), report.get("summaries")
    if card is None or not isinstance(summaries, dict):
        return []
    lines = []
    for what, path in card.headline:
        value = summaries
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, (dict, list)):
            lines.append(f"{what}: {value}")
    return lines


def review_page(output: Path, rows: list[tuple], reports: dict[str, dict]) -> str:
    """The page; ``reports``: the finished cases' reports by case ID (batch.finished_reports)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[_standing(row)] = counts.get(_standing(row), 0) + 1
    lines = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>SpineKneeSeg cohort review</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Cohort review: {len(rows)} case{'s' * (len(rows) != 1)}</h1>",
             "<p class='note'>" + ", ".join(f"<span class='{k}'>{n} {k}</span>" for k, n in sorted(
                 counts.items(), key=lambda item: _ATTENTION.get(item[0], 9))) + ". Failed, not run and flagged cases "
             "come first; each picture links to its full size, each ID to the case's report. The same rows as "
             "summary.tsv.</p>",
             "<table><tr><th>case</th><th>status</th><th>findings</th><th>warnings or message</th>"
             "<th>overlays</th></tr>"]
    for row in sorted(rows, key=lambda r: _ATTENTION.get(_standing(r), 9)):  # stable: manifest order within each
        case_id, status, standing = row[0], row[1], _standing(row)
        folder = output / case_id
        report = folder / "report.json"
        name = (f"<a href='{_href(output, report)}'>{html.escape(case_id)}</a>" if status in ("ok", "skipped")
                else html.escape(case_id))
        text = row[7] if status in ("ok", "skipped") else row[3]
        pictures = sorted((folder / "overlays").glob("*.png")) if status in ("ok", "skipped") else []
        images = "".join(f"<a href='{_href(output, p)}'><img loading='lazy' src='{_href(output, p)}' "
                         f"alt='{html.escape(p.stem)}' title='{html.escape(p.stem)}'></a>" for p in pictures)
        found = "<br>".join(map(html.escape, findings(reports.get(case_id, {}))))
        lines.append(f"<tr><td>{name}</td><td class='{standing}'>{html.escape(status)}</td>"
                     f"<td class='findings'>{found}</td><td class='note'>{html.escape(str(text))}</td>"
                     f"<td>{images}</td></tr>")
    lines += ["</table></body></html>", ""]
    return "\n".join(lines)


def write_review_page(output: Path, rows: list[tuple], reports: dict[str, dict]) -> Path:
    write_text_atomic(output / REVIEW_PAGE, review_page(output, rows, reports))
    return output / REVIEW_PAGE
