"""The run report: a browsable HTML report of an inference run, written beside ``predictions.csv`` and readable
offline from the folder alone (no scripts, no CDN, no server)::

    <output_dir>/report/index.html                 settings, summary, one table row per subject (and per failed
                                                   subject, with the reason from skipped.csv)
    <output_dir>/report/<subject>/index.html       mosaics of the first preset's map over the network input,
                                                   decision and probability, conservation, tissue shares, files
    <output_dir>/report/<subject>/<subject>_mosaic_<preset>.png

(names from ``scripts.runtime.outputs``). ``build_report`` makes it from what is on disk (``predictions.csv``,
``relevance.csv``, ``skipped.csv`` and the NIfTIs), so rank 0 of a sharded run and a rerun with nothing left to
do rebuild it the same way; ``RunReport`` is the Ignite handler that calls it when the evaluator completes.
Every file is written atomically, the index last; QC columns (``qc_pass``, ``qc_failed``, ``qc_*``) of
``predictions.csv`` are shown when present: the index says per subject whether it passed and which measures
failed, each score beside its threshold (from the QC reference next to the model), and what to do; the subject
page lists every score. Every page says that the model is for research use only, and the pages fit a 1280 px
wide window (long names and paths wrap).
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine, Events

from scripts.runtime.localisation import CSF_VENTRICLES, OUTSIDE_BRAIN, Localisation, localisation
from scripts.runtime.outputs import (
    atomic_write_text,
    file_sha256,
    input_path,
    read_rows,
    read_volume,
    relevance_path,
    remove_stale_temporaries,
    report_image,
    report_index,
    report_page,
)
from scripts.runtime.qc import ADVICE_START, SCAN_PLACEHOLDER, advice, load_thresholds, score_text
from scripts.runtime.reference import MEASURES
from scripts.runtime.visual import COLOUR_RULE, overlay_mosaic, plural, save_mosaic

__all__ = ["CLASSES", "RESEARCH_NOTICE", "RunReport", "build_report", "copy_report", "html_page", "html_table",
           "qc_flag"]

logger = logging.getLogger(__name__)
CLASSES = ("term", "preterm")
QC_PREFIX = "qc_"
RESEARCH_NOTICE = ("Research use only, not a clinical model: its predictions and relevance maps must not guide the "
                   "diagnosis or care of any baby.")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto; max-width: 1500px;
       padding: 0 1em; color: #1b1b1b; line-height: 1.4; overflow-wrap: anywhere; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #c8c8c8; padding: 0.25em 0.6em; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.wrap { overflow-wrap: anywhere; min-width: 8em; }
p.notice { border: 1px solid #b45309; background: #fff7e6; padding: 0.4em 0.7em; max-width: 70em; }
tr.misclassified td { background: #fde2e1; } tr.failed td { background: #fff1c2; }
tr.qc-flagged td:first-child { border-left: 5px solid #d97706; }
.badge { display: inline-block; padding: 0 0.45em; border-radius: 0.6em; font-size: 0.85em; margin-left: 0.3em; }
.badge.misclassified { background: #c62828; color: white; } .badge.failed { background: #8d6e00; color: white; }
.badge.qc-flagged { background: #d97706; color: white; } .badge.correct { background: #2e7d32; color: white; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { max-width: 70em; font-size: 0.92em; color: #333; }
nav { margin-bottom: 1em; } nav a { margin-right: 1.2em; }
.muted { color: #666; } code { background: #f4f4f4; padding: 0 0.2em; }
"""


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML page (inline style, no script, no external resource)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] | None = None,
               table_id: str = "", numeric: Sequence[bool] | None = None, wrap: Sequence[bool] | None = None) -> str:
    """A table whose cells are HTML already (escape text with ``html.escape`` first). ``numeric`` columns are
    right-aligned, never broken; ``wrap`` columns (names, paths, reasons) may break anywhere, so that a long name
    does not make the table wider than the window."""
    numeric = list(numeric or [False] * len(header))
    wrap = list(wrap or [False] * len(header))
    ident = f' id="{table_id}"' if table_id else ""
    lines = [f"<table{ident}>", "<thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if numeric[j] else f'<td class="wrap">{c}</td>' if wrap[j]
                        else f"<td>{c}</td>" for j, c in enumerate(row))
        lines.append(f"<tr{cls}>{cells}</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _href(target: Path, start: Path) -> str:
    """A relative, URL-quoted link from the folder ``start`` to ``target``."""
    return quote(Path(os.path.relpath(target, start)).as_posix())


def _link(target: Path, start: Path, text: str) -> str:
    return f'<a href="{_href(target, start)}">{html.escape(text)}</a>'


def _rich(text: str) -> str:
    """Plain text as HTML, what stands between backticks (commands, file contents) as code."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _notice() -> str:
    return f'<p class="notice"><b>{html.escape(RESEARCH_NOTICE)}</b></p>'


def qc_flag(row: Mapping[str, str]) -> bool | None:
    """True when a predictions row is flagged by QC (``qc_pass`` false or ``qc_failed`` not empty), False when it
    passed, None when the table has no QC columns or the values say nothing."""
    value = str(row.get("qc_pass", "")).strip().lower()
    failed = str(row.get("qc_failed", "")).strip()
    if value in ("false", "0", "no", "fail", "failed") or (failed and failed.lower() not in ("0", "false", "none",
                                                                                            "[]", "nan")):
        return True
    if value in ("true", "1", "yes", "pass", "passed"):
        return False
    return None


def _float(value, default=float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _int(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _class_name(index: int | None) -> str:
    return CLASSES[index] if index is not None and 0 <= index < len(CLASSES) else "-"


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


class _Subject:
    """Everything the report says about one subject."""

    def __init__(self, name: str, row: Mapping[str, str] | None = None, reason: str = "") -> None:
        self.name = name
        self.row = dict(row or {})
        self.reason = reason  # why it failed, empty when its maps are in the report
        self.prediction = _int(self.row.get("prediction"))
        self.label = _int(self.row.get("label"))
        self.prob = (_float(self.row.get("prob_term")), _float(self.row.get("prob_preterm")))
        self.qc = qc_flag(self.row)
        self.qc_failed = [m for m in str(self.row.get("qc_failed", "")).split(";") if m.strip()]
        self.conservation = float("nan")  # of the first preset's map, from relevance.csv
        self.mosaic = None
        self.tissue: Localisation | None = None  # of the first preset's map, when the datalist gives a tissue map

    @property
    def failed(self) -> bool:
        return bool(self.reason)

    @property
    def correct(self) -> bool | None:
        if self.label is None or self.prediction is None:
            return None
        return self.label == self.prediction

    def decision(self) -> str:
        if self.prediction is None:
            return "no prediction"
        return f"{_class_name(self.prediction)} (p({_class_name(self.prediction)}) = {self.prob[self.prediction]:.3f})"

    def classes(self) -> str:
        return " ".join(c for c, on in (("failed", self.failed), ("misclassified", self.correct is False),
                                        ("qc-flagged", self.qc is True)) if on)

    def badges(self) -> str:
        out = []
        if self.failed:
            out.append('<span class="badge failed">failed</span>')
        if self.correct is False:
            out.append('<span class="badge misclassified">misclassified</span>')
        if self.qc is True:
            out.append('<span class="badge qc-flagged">QC flagged</span>')
        return "".join(out)

    def qc_scores(self, thresholds: Mapping[str, float] | None) -> str:
        """``similarity 0.712 (max 0.571), ...`` for the failed measures, as HTML."""
        out = []
        for m in self.qc_failed:
            score = _float(self.row.get(f"{QC_PREFIX}{m}"))
            if score == score:
                out.append(score_text(m, score, (thresholds or {}).get(m)))
            else:
                out.append(m)
        return html.escape(", ".join(out))

    def qc_summary(self, thresholds: Mapping[str, float] | None) -> str:
        """The index's input-QC cell: passed, or flagged with the failed measures beside their thresholds."""
        if self.qc is None:
            return "-"
        if not self.qc:
            return "passed"
        return "<b>flagged</b>" + (f": {self.qc_scores(thresholds)}" if self.qc_failed else "")

    def advice(self) -> str:
        """What to do (``What to do: ...``, empty when nothing): about a QC flag, the run's ``qc_advice`` column (else
        from the failed measures); about a subject refused by QC, the end of its reason."""
        if self.qc is True:
            return str(self.row.get("qc_advice", "")).strip() or advice(
                [m for m in self.qc_failed if m in MEASURES], self.row.get("image") or None)
        return ADVICE_START + self.reason.split(ADVICE_START, 1)[1] if ADVICE_START in self.reason else ""

    def short_reason(self) -> str:
        """Why it failed, without what to do (that goes once per kind of advice on the index)."""
        return self.reason.split(ADVICE_START, 1)[0].strip()

    def generic_advice(self) -> str:
        """``advice`` with the scan's own path replaced by the placeholder, so subjects can share it."""
        text, image = self.advice(), str(self.row.get("image", ""))
        return text.replace(json.dumps(image)[1:-1], SCAN_PLACEHOLDER) if image else text


def _settings_table(settings: Mapping[str, str]) -> str:
    return html_table(["setting", "value"], [[html.escape(k), v] for k, v in settings.items()], wrap=[False, True])


def _subject_page(output_dir: Path, subject: _Subject, preset: str, presets: Sequence[str],
                  relevance_rows: Mapping[tuple, Mapping[str, str]], previous: str | None, following: str | None,
                  target_note: str, thresholds: Mapping[str, float] | None = None) -> str:
    page = report_page(output_dir, subject.name)
    here = page.parent
    nav = [_link(report_index(output_dir), here, "all subjects")]
    if previous:
        nav.append(_link(report_page(output_dir, previous), here, f"previous: {previous}"))
    if following:
        nav.append(_link(report_page(output_dir, following), here, f"next: {following}"))
    body = [f"<nav>{''.join(nav)}</nav>", f"<h1>{html.escape(subject.name)} {subject.badges()}</h1>", _notice()]
    facts = [f"<b>Prediction:</b> {html.escape(subject.decision())}"]
    if subject.label is not None:
        facts.append(f"<b>Label:</b> {_class_name(subject.label)} — "
                     + ("correct" if subject.correct else "<b>misclassified</b>"))
    if subject.qc is not None:
        facts.append("<b>Input QC:</b> " + subject.qc_summary(thresholds))
    body.append("<p>" + "<br>".join(facts) + "</p>")
    if subject.failed:
        body.append(f'<p class="failed"><b>No relevance map:</b> {html.escape(subject.short_reason())}</p>')
    if subject.advice():
        body.append(f'<p class="advice">{_rich(subject.advice())}</p>')
    if subject.mosaic is not None:
        mosaic = subject.mosaic
        image = report_image(output_dir, subject.name, f"mosaic_{preset}")
        decided = subject.decision()
        underlay = "over the network input (grey)" if mosaic.with_input else "(the network input was not saved)"
        caption = (f"{html.escape(subject.name)}: prediction {html.escape(decided)}. LRP {html.escape(preset)} "
                   f"relevance {underlay} ({html.escape(target_note)}); {html.escape(COLOUR_RULE)}: "
                   f"L = {mosaic.limit:.3g} (colour bar), opacity grows with |relevance|. Rows: axial, coronal, "
                   f"sagittal slices through the brain (RAS: the subject's right on the right). "
                   f"{100 * mosaic.saturation:.1f} % of the shown brain pixels reach 0.98 L.")
        body.append(f'<figure><img src="{_href(image, here)}" alt="relevance mosaic of {html.escape(subject.name)}" '
                    f'data-limit-low="{-mosaic.limit:.6g}" data-limit-high="{mosaic.limit:.6g}">'
                    f"<figcaption>{caption}</figcaption></figure>")
    rows = []
    for p in presets:
        r = relevance_rows.get((subject.name, p), {})
        nifti = relevance_path(output_dir, subject.name, p)
        rows.append([html.escape(p), html.escape(r.get("start_relevance", "-") or "-"),
                     _fmt(_float(r.get("conservation")), 3), html.escape(r.get("relevance_sum", "-") or "-"),
                     _class_name(_int(r.get("target"))),
                     _link(nifti, here, nifti.name) if nifti.is_file() else '<span class="muted">missing</span>'])
    if rows:
        body += ["<h2>Relevance maps</h2>",
                 html_table(["preset", "explained logit", "conservation", "relevance sum", "explained class",
                             "NIfTI"], rows, numeric=[False, True, True, True, False, False],
                            wrap=[False] * 5 + [True])]
        if _float(relevance_rows.get((subject.name, presets[0]), {}).get("start_relevance"), 0.0) < 0:
            body.append('<p class="muted">The explained logit is negative, so the map starts from negative '
                        "relevance: alpha-beta rules keep that sign, and an alpha1-beta0 map is then entirely "
                        "negative (blue), although the class was predicted.</p>")
    network_input = input_path(output_dir, subject.name)
    if network_input.is_file():
        body.append(f"<p>Network input: {_link(network_input, here, network_input.name)}</p>")
    if subject.tissue:
        body += [f"<h2>Positive relevance per tissue ({html.escape(preset)})</h2>", *_tissue_table(subject.tissue)]
    qc_columns = [c for c in subject.row if c.startswith(QC_PREFIX) and c not in ("qc_pass", "qc_failed", "qc_advice")]
    if subject.qc is not None or qc_columns:
        rows = []
        for column in qc_columns:
            measure = column[len(QC_PREFIX):]
            threshold = (thresholds or {}).get(measure)
            value = html.escape(str(subject.row[column]))
            score = _float(subject.row[column])
            if measure in MEASURES and score == score:
                value = html.escape(score_text(measure, score, threshold).removeprefix(f"{measure} "))
            result = "-"
            if measure in MEASURES and subject.qc is not None:
                result = "<b>failed</b>" if measure in subject.qc_failed else "passed"
            rows.append([html.escape(measure), value, result])
        body += ["<h2>Input QC</h2>",
                 "<p>Each measure is a badness (larger is worse) and fails above its threshold (max), the training "
                 "subjects' maximum times a margin (docs/qc.md, thresholds).</p>",
                 html_table(["measure", "score (threshold)", "result"], rows, table_id="qc")]
    return html_page(f"{subject.name}: run report", "\n".join(body))


def _tissue_table(loc: Localisation) -> list[str]:
    """The subject page's tissue panel: each drawem9 tissue and CSF + ventricles with its share of the map's positive
    relevance, its share of the brain and the enrichment (``scripts.runtime.localisation``), then the outside-brain
    share."""
    rows = [[html.escape(name), _fmt(v["share"] * 100, 1), _fmt(v["brain_share"] * 100, 1), _fmt(v["enrichment"], 2)]
            for name, v in loc.items() if name != OUTSIDE_BRAIN]
    rows.append([f"<i>{OUTSIDE_BRAIN}</i>", _fmt(loc[OUTSIDE_BRAIN]["share"] * 100, 1), "-", "-"])
    out = [f"<p>Relevance share: the region's part of the map's positive relevance (relevance outside the brain "
           "included); share of the brain: its part of the brain's voxels (tissue label &gt; 0); enrichment = "
           f"relevance share / share of the brain (1 = no preference within the brain). {CSF_VENTRICLES}: CSF and "
           f"ventricles together; {OUTSIDE_BRAIN}: the share of the positive relevance that lies outside the "
           "brain.</p>"]
    if loc[OUTSIDE_BRAIN]["share"] != loc[OUTSIDE_BRAIN]["share"]:
        out.append('<p class="muted">This map has no positive relevance, so it has no shares.</p>')
    out.append(html_table(["region", "relevance share (%)", "share of the brain (%)", "enrichment"], rows,
                          table_id="tissue", numeric=[False, True, True, True]))
    return out


def _index_page(output_dir: Path, subjects: list[_Subject], settings: Mapping[str, str], preset: str,
                qc_columns: list[str], paged: set[str], thresholds: Mapping[str, float] | None = None) -> str:
    here = report_index(output_dir).parent
    body = ["<h1>Run report</h1>", _notice(), "<h2>Settings</h2>", _settings_table(settings)]
    predicted = [s for s in subjects if s.prediction is not None]
    labelled = [s for s in predicted if s.correct is not None]
    summary = [f"{plural(len(predicted), 'subject')} predicted ({sum(s.prediction == 1 for s in predicted)} "
               f"preterm, {sum(s.prediction == 0 for s in predicted)} term)"]
    if labelled:
        wrong = sum(s.correct is False for s in labelled)
        summary.append(f"{len(labelled)} with labels: {len(labelled) - wrong} correct, {wrong} misclassified "
                       f"(accuracy {(len(labelled) - wrong) / len(labelled):.3f})")
    failed = [s for s in subjects if s.failed]
    if failed:
        summary.append(f"{len(failed)} failed (no relevance map)")
    flagged = [s for s in subjects if s.qc is True]
    if qc_columns:
        summary.append(f"{len(flagged)} flagged by input QC")
    body += ["<h2>Summary</h2>", "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary) + "</ul>"]
    attention = [s for s in subjects if s.classes()]
    if attention:
        items = []
        for s in attention:
            name = _link(report_page(output_dir, s.name), here, s.name) if s.name in paged else html.escape(s.name)
            reason = f": {html.escape(s.short_reason())}" if s.failed else ""
            if s.qc is True:
                reason += f"; input QC {s.qc_summary(thresholds)}"
            items.append(f"<li>{name} {s.badges()}{reason}</li>")
        body += ["<h2>Needs attention</h2>", "<ul>" + "".join(items) + "</ul>"]
    advised: dict[str, list[str]] = {}  # what to do -> the subjects it is for
    for s in subjects:
        if s.generic_advice():
            advised.setdefault(s.generic_advice(), []).append(
                _link(report_page(output_dir, s.name), here, s.name) if s.name in paged else html.escape(s.name))
    if advised:
        items = [f"<li><b>{plural(len(names), 'subject')}</b> ({', '.join(names)}): "
                 f"{_rich(text.removeprefix(ADVICE_START))}</li>" for text, names in advised.items()]
        body += ["<h2>What to do about input QC</h2>",
                 f"<p>Commands run from the bundle folder; {SCAN_PLACEHOLDER} stands for each subject's scan (a "
                 "subject's page gives them with its own path).</p>", "<ul>" + "".join(items) + "</ul>"]
    with_qc = bool(qc_columns)
    header = ["subject", "p(term)", "p(preterm)", "prediction", "label", "correct", f"conservation ({preset})",
              *(["input QC"] if with_qc else []), "status"]
    rows, classes = [], []
    for s in subjects:
        name = _link(report_page(output_dir, s.name), here, s.name) if s.name in paged else html.escape(s.name)
        correct = "-" if s.correct is None else ("yes" if s.correct else "<b>no</b>")
        status = f"failed: {html.escape(s.short_reason())}" if s.failed else "ok"
        rows.append([name, _fmt(s.prob[0]), _fmt(s.prob[1]), _class_name(s.prediction), _class_name(s.label), correct,
                     _fmt(s.conservation, 3), *([s.qc_summary(thresholds)] if with_qc else []),
                     status + s.badges()])
        classes.append(s.classes())
    qc_note = (" Input QC: flagged subjects list each failed measure's score beside its threshold (max); every score "
               "is on the subject's page." if with_qc else "")
    body += ["<h2>Predictions</h2>",
             "<p>One row per subject; red rows: misclassified (label known), yellow rows: failed (reason given), an "
             f"orange left edge: flagged by input QC. Each subject's page shows its relevance mosaics.{qc_note}</p>",
             html_table(header, rows, classes, table_id="predictions",
                        numeric=[False, True, True, False, False, False, True, *([False] if with_qc else []), False],
                        wrap=[True, *[False] * (len(header) - 2), True])]
    return html_page("Run report", "\n".join(body))


def build_report(output_dir: str | os.PathLike, presets: Sequence[str] | None = None, target: str | int | None = None,
                 ckpt_path: str | None = None, run_key: str = "", items: Sequence[Mapping] | None = None,
                 label_transform: Callable | None = None, slices: int = 5, settings: Mapping | None = None) -> Path:
    """Write the run report of ``output_dir`` from its tables and maps and return the index page.

    Args:
        output_dir: the inference's output folder (``predictions.csv``, ``relevance.csv``, ``skipped.csv``, maps).
        presets: the LRP presets of the run, the first gets mosaics (default: those in ``relevance.csv``).
        target: the explained class setting (``pred``, a class index, ``difference``), for the settings table.
        ckpt_path: the model file, named with its SHA-256 in the settings table.
        run_key: the run's key (``scripts.runtime.outputs.run_key``).
        items: datalist items; a subject's ``tissue`` map gives the localisation of its relevance per tissue
            (``scripts.runtime.localisation``: shares and enrichment against the brain).
        label_transform: the spatial preprocessing of label maps (``label_preprocessing`` of inference.json), which
            brings a ``tissue`` map onto the network grid.
        slices: slices per plane in the mosaics.
        settings: more rows for the settings table.
    """
    start = time.perf_counter()
    output = Path(output_dir)
    predictions = read_rows(output / "predictions.csv")
    relevance_rows = {(r.get("subject", ""), r.get("preset", "")): r for r in read_rows(output / "relevance.csv")}
    skipped = read_rows(output / "skipped.csv")
    presets = list(presets or dict.fromkeys(p for _, p in relevance_rows))
    preset = presets[0] if presets else ""
    by_item = {str(it.get("subject", "")): it for it in (items or [])}
    qc_columns = [c for c in (predictions[0] if predictions else {}) if c.startswith(QC_PREFIX)]
    thresholds = load_thresholds(Path(ckpt_path).parent) if ckpt_path and qc_columns else None

    subjects: list[_Subject] = []
    for row in predictions:
        subject = _Subject(row.get("subject", ""), row)
        subject.conservation = _float(relevance_rows.get((subject.name, preset), {}).get("conservation"))
        subjects.append(subject)
        if not preset:
            subject.reason = "relevance.csv lists no relevance map"
            continue
        try:
            relevance, affine = read_volume(relevance_path(output, subject.name, preset))
            network_input = input_path(output, subject.name)
            image = read_volume(network_input)[0] if network_input.is_file() else None
            subject.mosaic = overlay_mosaic(relevance, affine, image, slices=slices)
            save_mosaic(subject.mosaic, report_image(output, subject.name, f"mosaic_{preset}"),
                        title=f"{subject.name}: LRP {preset}, prediction {subject.decision()}")
        except (OSError, ValueError) as err:
            subject.reason = str(err)
            subject.mosaic = None
            report_image(output, subject.name, f"mosaic_{preset}").unlink(missing_ok=True)  # no stale picture
            continue
        item = by_item.get(subject.name)
        if item is not None and item.get("tissue") and label_transform is not None:
            try:
                tissue = np.asarray(label_transform({"tissue": item["tissue"]})["tissue"])[0]
                subject.tissue = localisation(relevance, tissue)
            except Exception as err:  # a tissue map that does not load or fit is reported, not fatal
                logger.warning("%s: no tissue shares (%s: %s)", subject.name, type(err).__name__, err)
    done = {s.name for s in subjects}
    for row in skipped:
        name = row.get("subject", "") or Path(row.get("image", "")).name
        if name not in done:
            subjects.append(_Subject(name, {"image": row.get("image", "")}, row.get("reason", "") or "skipped"))
            done.add(name)

    key = run_key or next((r.get("run_key", "") for r in predictions if r.get("run_key")), "")
    table: dict[str, str] = {
        "model file": html.escape(str(ckpt_path or "-")),
        "model SHA-256": f"<code>{file_sha256(ckpt_path) if ckpt_path and Path(ckpt_path).is_file() else '-'}</code>",
        "run key": f"<code>{html.escape(key or '-')}</code>",
        "LRP presets": html.escape(", ".join(presets) or "-") + (f" (mosaics: {html.escape(preset)})" if preset
                                                                   else ""),
        "explained class (target)": html.escape(str(target if target is not None else "-")),
    }
    if thresholds:
        table["input QC thresholds (max)"] = html.escape(", ".join(f"{m} {v:.3g}" for m, v in thresholds.items()))
    table.update({html.escape(str(k)): html.escape(str(v)) for k, v in (settings or {}).items()})
    table["written"] = datetime.now(UTC).isoformat(timespec="seconds")
    table["output folder"] = html.escape(str(output.resolve()))
    for name in ("predictions.csv", "relevance.csv", "skipped.csv"):
        if (output / name).is_file():
            table[name] = _link(output / name, report_index(output).parent, name)

    explained = {"pred": "the predicted class", "difference": "preterm minus term"}.get(
        str(target), _class_name(_int(target)) if _int(target) is not None else "see relevance.csv")
    target_note = f"explained class: {explained}"
    pages = [s for s in subjects if s.mosaic is not None or (s.failed and s.prediction is not None)]
    for i, subject in enumerate(pages):
        previous = pages[i - 1].name if i > 0 else None
        following = pages[i + 1].name if i + 1 < len(pages) else None
        atomic_write_text(_subject_page(output, subject, preset, presets, relevance_rows, previous, following,
                                        target_note, thresholds), report_page(output, subject.name))
    index = atomic_write_text(_index_page(output, subjects, table, preset, qc_columns, {s.name for s in pages},
                                          thresholds), report_index(output))
    logger.info("run report: %s (%s, %d failed) in %.1f s", index, plural(len(subjects), "subject"),
                sum(s.failed for s in subjects), time.perf_counter() - start)
    return index


_LINK = re.compile(r'<a href="([^"]*)">(.*?)</a>', re.S)


def copy_report(output_dir: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Copy the run report of ``output_dir`` (its pages and mosaics) to the folder ``destination`` so that it can
    travel without the run's folder, e.g. beside a study's results: a link that leads out of the report (a NIfTI,
    a table of the run) becomes its plain text, so the copy has no broken link. The copy is built beside
    ``destination`` and moved into place, so a reader never sees half of it; returns the copy's index page."""
    source = report_index(output_dir).parent.resolve()
    if not report_index(output_dir).is_file():
        raise FileNotFoundError(f"no run report to copy: {report_index(output_dir)} does not exist")
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"cannot copy the run report to {destination}: it exists and is not a folder")
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(destination.parent, depth=0)  # the half-built copy of a killed run
    building = Path(tempfile.mkdtemp(prefix=f".{destination.name}.{os.getpid()}.", suffix=".tmp",
                                     dir=destination.parent))
    old = building.with_name(f"{building.name}-old")

    def local(match: re.Match, page: Path) -> str:
        target = (page.parent / unquote(match.group(1))).resolve()
        return match.group(0) if target.is_relative_to(source) else f'<span class="muted">{match.group(2)}</span>'

    try:
        for path in sorted(source.rglob("*")):
            if path.name.startswith(".") or not path.is_file():
                continue  # an atomic write of the report in progress, or not a file
            copy = building / path.relative_to(source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".html":
                copy.write_text(_LINK.sub(lambda m, page=path: local(m, page), path.read_text()))
            else:
                shutil.copyfile(path, copy)
        building.chmod(0o755)  # mkdtemp makes it private; the copy is for readers
        if destination.exists():
            destination.rename(old)
        try:
            building.rename(destination)
        except OSError:
            if old.exists() and not destination.exists():
                old.rename(destination)  # the earlier copy stays in place
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return destination / "index.html"


class RunReport:
    """Ignite handler writing the run report (``build_report``) when the evaluator completes, on rank 0 (after
    ``PredictionWriter`` merged the ranks' tables: attach it after that handler).

    Args:
        output_dir: the inference's output folder.
        enabled: write the report (config key ``report``).
        presets / target / ckpt_path / run_key: the run's settings, shown in the report.
        datalist / split: the datalist and split of the run; its items' ``tissue`` maps give tissue shares.
        label_transform: the spatial preprocessing of label maps (``label_preprocessing``).
        slices: slices per plane in the mosaics.
    """

    def __init__(self, output_dir: str, enabled: bool = True, presets: Sequence[str] | None = None,
                 target: str | int = "pred", ckpt_path: str | None = None, run_key: str = "",
                 datalist: str | None = None, split: str | None = None, label_transform: Callable | None = None,
                 slices: int = 5) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = bool(enabled)
        self.presets = list(presets) if presets is not None else None
        self.target = target
        self.ckpt_path = ckpt_path
        self.run_key = str(run_key)
        self.datalist, self.split = datalist, split
        self.label_transform = label_transform
        self.slices = int(slices)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> Path | None:
        return self.build()

    def _items(self) -> list[dict]:
        if not self.datalist:
            return []
        from scripts.runtime.datalist import load_split  # noqa: PLC0415 (datalist imports checks -> outputs only)

        try:
            return load_split(self.datalist, self.split or "test", -1, require_label=False, check_files=False)
        except (OSError, ValueError) as err:
            logger.warning("run report: no datalist items (%s)", err)
            return []

    def build(self) -> Path | None:
        """Write the report now (rank 0 only; nothing when disabled)."""
        if not self.enabled or idist.get_rank() != 0:
            return None
        settings = {"datalist": self.datalist or "-", "split": self.split or "-"}
        return build_report(self.output_dir, self.presets, self.target, self.ckpt_path, self.run_key, self._items(),
                            self.label_transform, self.slices, settings)

    def build_if_idle(self, data: Sequence) -> Path | None:
        """Rebuild the report when the evaluator had nothing to do (every subject finished by an earlier run), so a
        rerun still refreshes it; when the evaluator ran, the handler has written it already."""
        return None if len(data) else self.build()
