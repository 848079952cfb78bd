"""Visual and numeric quality control: per-subject HTML reports and the group summary.

Figures are nilearn plots (matplotlib, no display): the registered image under the
template's outline, before and after, and each co-registered contrast under the
reference's outline. Numbers: the correlation with the template inside its brain mask
after registration, the share of folded voxels of the deformation, and run times.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

import nibabel as nb
import numpy as np

from .derivatives import atomic_write_text

SUMMARY_FIELDS = ["participant", "session", "reference", "template", "mode", "lambda",
                  "device", "registration_s", "similarity", "folding_pct", "outlier"]


def _plot(image, contour_of, out_png: Path, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    out_png.parent.mkdir(parents=True, exist_ok=True)
    values = np.asanyarray(nb.load(image).dataobj, dtype=np.float32)
    positive = values[values > 0]
    vmax = float(np.percentile(positive, 99.5)) if positive.size else 1.0
    display = plotting.plot_anat(image, display_mode="ortho", title=title, dim=0,
                                 vmin=0, vmax=vmax, colorbar=False, annotate=False,
                                 draw_cross=False, black_bg=True)
    data = np.asanyarray(nb.load(contour_of).dataobj, dtype=np.float32)
    if set(np.unique(data)) <= {0.0, 1.0}:  # a mask: its edge
        levels = [0.5]
    else:  # an image: two intensity levels of its bright part, above background noise
        levels = list(np.percentile(data[data > 0.1 * data.max()], [40, 85]))
    display.add_contours(contour_of, levels=levels, colors="r", linewidths=0.8)
    display.savefig(str(out_png), dpi=80)
    display.close()
    plt.close("all")
    return str(out_png)


def similarity(moved: str, template: str, mask: str | None) -> float:
    """Pearson correlation of the registered image and the template (inside the
    template's brain mask when there is one)."""
    a = np.asanyarray(nb.load(moved).dataobj, dtype=np.float64)
    b = np.asanyarray(nb.load(template).dataobj, dtype=np.float64)
    keep = np.asanyarray(nb.load(mask).dataobj) > 0 if mask else np.ones(b.shape, bool)
    if a.shape != b.shape or keep.sum() < 10:
        return float("nan")
    return float(np.corrcoef(a[keep], b[keep])[0, 1])


def folding_pct(transform: str) -> float:
    """Percentage of voxels where the deformation of an ITK composite folds (Jacobian
    determinant <= 0); 0 for an affine transform."""
    import torch

    from ..ops.jacobian import folding_percent
    from ..transforms import DisplacementField, load_transform

    chain = load_transform(transform).chain
    fields = [t for t in chain.transforms if isinstance(t, DisplacementField)]
    if not fields:
        return 0.0
    pct = 0.0
    for f in fields:
        to_vox = np.linalg.inv(f.grid.affine[:3, :3])
        disp = torch.from_numpy(f.field.astype(np.float64) @ to_vox.T)
        pct = max(pct, folding_percent(disp))
    return pct


def _row(summary: dict) -> str:
    cells = "".join(f"<td>{html.escape(str(summary.get(k, '')))}</td>" for k in SUMMARY_FIELDS)
    return f"<tr>{cells}</tr>"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #bbb; padding: .3em .6em; }}
img {{ max-width: 100%; }} .flag {{ background: #fdd; }} h2 {{ border-bottom: 1px solid #ccc; }}
</style></head><body>
<h1>{title}</h1>
{body}
<p><small>synthmorph-nipype {version}</small></p>
</body></html>
"""


def write_subject_report(out_html: Path, summary: dict, figures: list[tuple[str, str]],
                         version: str) -> Path:
    """The HTML report of one participant (figures are paths relative to its folder)."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary.items())
    body = f"<h2>Summary</h2><table>{rows}</table>"
    for caption, rel in figures:
        body += (f"<h2>{html.escape(caption)}</h2>"
                 f'<img src="{html.escape(rel)}" alt="{html.escape(caption)}">')
    atomic_write_text(out_html, PAGE.format(
        title=html.escape(f"SynthMorph: {summary['unit']}"), body=body,
        version=html.escape(version)))
    return out_html


def flag_outliers(rows: list[dict], key: str = "similarity", k: float = 3.0) -> None:
    """Mark rows whose ``key`` lies more than ``k`` robust deviations (MAD) below the
    median, or that failed to produce it (NaN)."""
    values = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    med = statistics.median(values) if values else float("nan")
    mad = statistics.median([abs(v - med) for v in values]) * 1.4826 if values else 0.0
    for r in rows:
        v = r.get(key)
        low = v is None or not np.isfinite(v) or (mad > 0 and v < med - k * mad) or (
            mad == 0 and len(values) > 2 and v < med - 0.05)
        fold = (r.get("folding_pct") or 0) > 0.1
        r["outlier"] = "yes" if low or fold else "no"


def write_group_report(output_dir: str | Path, version: str) -> tuple[Path, Path, int]:
    """``group_summary.tsv`` and ``group_report.html`` over every participant summary
    under ``output_dir``; returns their paths and the number of outliers."""
    out = Path(output_dir)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("sub-*/**/log/*_summary.json"))]
    flag_outliers(rows)
    tsv = out / "group_summary.tsv"
    lines = ["\t".join(SUMMARY_FIELDS)]
    for r in rows:
        lines.append("\t".join("n/a" if r.get(k) is None else str(r[k])
                               for k in SUMMARY_FIELDS))
    atomic_write_text(tsv, "\n".join(lines) + "\n")
    head = "".join(f"<th>{k}</th>" for k in SUMMARY_FIELDS)
    body_rows = "".join(_row(r).replace("<tr>", '<tr class="flag">', 1)
                        if r["outlier"] == "yes" else _row(r) for r in rows)
    n_out = sum(r["outlier"] == "yes" for r in rows)
    body = (f"<p>{len(rows)} registration(s), {n_out} flagged (similarity more than 3 MAD "
            "below the median, or folding above 0.1 %).</p>"
            f"<table><tr>{head}</tr>{body_rows}</table>")
    page = out / "group_report.html"
    atomic_write_text(page, PAGE.format(title="SynthMorph: group summary", body=body,
                                        version=html.escape(version)))
    return tsv, page, n_out
