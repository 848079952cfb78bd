"""Visual and numeric quality control: per-subject HTML reports and the group summary.

Figures are fMRIPrep's reportlets (niworkflows): SVGs that flicker between the template
and the registered image under the template's brain outline, and between the reference
and each co-registered contrast. Numbers: the correlation with the template inside its
brain mask after registration, the share of folded voxels of the deformation, and run
times. The group report plots every registration's similarity and folding against the
outlier thresholds, beside the table.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

import nibabel as nb
import numpy as np

from ..io.atomic import OutputSet, atomic_write_text

SUMMARY_FIELDS = ["participant", "session", "reference", "template", "mode", "lambda",
                  "device", "registration_s", "similarity", "folding_pct", "outlier"]


def flicker_reportlet(fixed: str, moved: str, out_svg: Path, *, labels: tuple[str, str],
                      contour: str | None = None) -> str:
    """A before/after reportlet as fMRIPrep's (niworkflows): axial, coronal and sagittal
    cuts of ``fixed`` and of ``moved`` (on the same grid) in one SVG that flickers from
    one to the other under the mouse, with ``contour`` (a mask) outlined on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from niworkflows.viz.utils import compose_view, cuts_from_bbox, plot_registration

    out_svg.parent.mkdir(parents=True, exist_ok=True)
    fixed_img, moved_img = nb.load(fixed), nb.load(moved)
    mask = nb.load(contour) if contour else None
    if mask is None:  # cut where the fixed image has signal
        data = np.asanyarray(fixed_img.dataobj, dtype=np.float32)
        mask = nb.Nifti1Image((data > np.percentile(data[data > 0], 20)).astype(np.uint8)
                              if (data > 0).any() else np.ones(data.shape, np.uint8),
                              fixed_img.affine)
    cuts = cuts_from_bbox(mask, cuts=7)
    views = [plot_registration(img, div_id, estimate_brightness=True, cuts=cuts, label=label,
                               contour=mask if contour else None, compress=False)
             for img, div_id, label in ((fixed_img, "fixed-image", labels[0]),
                                        (moved_img, "moving-image", labels[1]))]
    with OutputSet() as out:
        compose_view(views[0], views[1], out_file=out.temp(out_svg))
    plt.close("all")
    return str(out_svg)


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
img, .reportlet {{ max-width: 100%; width: 100%; }} .flag {{ background: #fdd; }}
h2 {{ border-bottom: 1px solid #ccc; }}
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
        body += (f"<h2>{html.escape(caption)}</h2><p><small>Hover over the image to "
                 "flicker between the two.</small></p>"
                 f'<object type="image/svg+xml" data="{html.escape(rel)}" '
                 f'class="reportlet">{html.escape(caption)}</object>')
    atomic_write_text(out_html, PAGE.format(
        title=html.escape(f"SynthMorph: {summary['unit']}"), body=body,
        version=html.escape(version)))
    return out_html


FOLDING_LIMIT = 0.1  # % of voxels: more folding flags a registration


def flag_outliers(rows: list[dict], key: str = "similarity", k: float = 3.0) -> float:
    """Mark rows whose ``key`` lies more than ``k`` robust deviations (MAD) below the
    median, or that failed to produce it (NaN), or that fold more than
    :data:`FOLDING_LIMIT`; returns the similarity threshold (NaN without values).

    >>> rows = [{"similarity": v} for v in (0.9, 0.91, 0.89, 0.9, 0.5)]
    >>> round(flag_outliers(rows), 3), [r["outlier"] for r in rows]
    (0.856, ['no', 'no', 'no', 'no', 'yes'])
    """
    values = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    med = statistics.median(values) if values else float("nan")
    mad = statistics.median([abs(v - med) for v in values]) * 1.4826 if values else 0.0
    threshold = med - k * mad if mad > 0 else (med - 0.05 if len(values) > 2 else -np.inf)
    for r in rows:
        v = r.get(key)
        low = v is None or not np.isfinite(v) or v < threshold
        fold = (r.get("folding_pct") or 0) > FOLDING_LIMIT
        r["outlier"] = "yes" if low or fold else "no"
    return threshold if values else float("nan")


def group_figure(rows: list[dict], threshold: float, out_svg: Path) -> str:
    """Each registration's similarity against its folding, named, with the outlier
    thresholds (the similarity limit and :data:`FOLDING_LIMIT`), as MRIQC's group plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_svg.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: searchable
        return _group_figure(plt, rows, threshold, out_svg)


def _group_figure(plt, rows: list[dict], threshold: float, out_svg: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x = r.get("similarity")
        x = x if x is not None and np.isfinite(x) else 0.0
        y = r.get("folding_pct") or 0.0
        flagged = r.get("outlier") == "yes"
        name = f"sub-{r['participant']}" + (f" ses-{r['session']}" if r.get("session")
                                            not in (None, "n/a") else "")
        point = ax.scatter([x], [y], s=40, color="#c0392b" if flagged else "#2c7fb8",
                           zorder=3)
        point.set_gid(name)  # the SVG element carries the name
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if np.isfinite(threshold):
        ax.axvline(threshold, color="#c0392b", ls="--", lw=1,
                   label=f"similarity limit {threshold:.3f} (median - 3 MAD)")
    ax.axhline(FOLDING_LIMIT, color="#e67e22", ls=":", lw=1,
               label=f"folding limit {FOLDING_LIMIT} %")
    ax.set_xlabel("similarity to the template (correlation in the brain mask)")
    ax.set_ylabel("folded voxels (%)")
    ax.set_title(f"{len(rows)} registration(s); red: flagged")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with OutputSet() as out:
        fig.savefig(out.temp(out_svg), format="svg")
    plt.close(fig)
    return str(out_svg)


def write_group_report(output_dir: str | Path, version: str) -> tuple[Path, Path, int]:
    """``group_summary.tsv`` and ``group_report.html`` over every participant summary
    under ``output_dir``; returns their paths and the number of outliers."""
    out = Path(output_dir)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("sub-*/**/log/*_summary.json"))]
    threshold = flag_outliers(rows)
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
    figure = group_figure(rows, threshold, out / "figures" / "group_qc.svg")
    body = (f"<p>{len(rows)} registration(s), {n_out} flagged (similarity more than 3 MAD "
            f"below the median, or folding above {FOLDING_LIMIT} %).</p>"
            f'<object type="image/svg+xml" data="{Path(figure).relative_to(out)}" '
            'class="reportlet">similarity and folding of each registration</object>'
            f"<table><tr>{head}</tr>{body_rows}</table>")
    page = out / "group_report.html"
    atomic_write_text(page, PAGE.format(title="SynthMorph: group summary", body=body,
                                        version=html.escape(version)))
    return tsv, page, n_out
