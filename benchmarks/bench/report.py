"""The summary of the runs and the Markdown report."""

from __future__ import annotations

import statistics

from .pairs import TISSUES


def summarize(runs: list[dict]) -> list[dict]:
    """Medians over the successful repeats of each (pair, method)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["pair"], r["method"]), []).append(r)
    out = []
    for (pair, method), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        row: dict = {"pair": pair, "method": method, "runs": len(rs), "ok": len(ok)}
        if not ok:
            row["reason"] = rs[-1].get("reason", "")
        else:
            def med(get, ok=ok):
                return float(statistics.median(get(r) for r in ok))

            walls = [r["wall_s"] for r in ok]
            known = "error_mm_mean" in ok[0]
            row.update(
                dice_after=med(lambda r: r["dice"]["mean"]),
                dice_after_tissue={t: med(lambda r, t=t: r["dice"][t]) for t in TISSUES}
                if TISSUES[0] in ok[0]["dice"] else None,
                folding_pct_brain=med(lambda r: r["folding_pct_brain"]),
                folding_pct_all=med(lambda r: r["folding_pct_all"]),
                error_mm_mean=med(lambda r: r["error_mm_mean"]) if known else None,
                error_mm_max=med(lambda r: r["error_mm_max"]) if known else None,
                wall_s_median=float(statistics.median(walls)), wall_s_min=min(walls),
                wall_s_max=max(walls), cpu_s_median=med(lambda r: r["cpu_s"]),
                peak_rss_gb=med(lambda r: r["peak_rss_gb"]))
            if all("dice_tool" in r for r in ok):
                row["dice_tool"] = med(lambda r: r["dice_tool"]["mean"])
        out.append(row)
    return out


def markdown(results: dict) -> str:
    """The report: one table row per (pair, method), then skipped methods and notes."""
    pairs = results["pairs"]
    lines = [
        f"# Registration accuracy and speed ({results['config']['resolution']} mm template, "
        f"{results['config']['threads']} threads, {results['config']['repeats']} run(s)"
        f"{', quick settings' if results['config']['quick'] else ''})", "",
        "| pair | method | Dice before -> after (truth) | CSF / GM / WM after "
        "| folding % brain (all) | error vs truth mm, mean (max) | wall s, median (min-max) "
        "| peak RSS GB |",
        "|---|---|---|---|---|---|---|---|"]
    warnings = []
    for row in results["summary"]:
        pair = pairs[row["pair"]]
        before = f"{pair['dice_before']['mean']:.3f}"
        truth = f"({pair['dice_truth']['mean']:.3f})" if pair["dice_truth"] else "(-)"
        label = f"{row['pair']} ({pair['truth']})"
        if not row["ok"]:
            lines.append(f"| {label} | {row['method']} | {before} -> failed {truth} | | | | | |")
            warnings.append(f"{row['pair']} / {row['method']} failed: {row['reason']}")
            continue
        tissue = " / ".join(f"{row['dice_after_tissue'][t]:.3f}" for t in TISSUES) \
            if row["dice_after_tissue"] else "(brain labels)"
        error = "-" if row["error_mm_mean"] is None else \
            f"{row['error_mm_mean']:.2f} ({row['error_mm_max']:.2f})"
        lines.append(
            f"| {label} | {row['method']} | {before} -> {row['dice_after']:.3f} {truth} "
            f"| {tissue} "
            f"| {row['folding_pct_brain']:.3f} ({row['folding_pct_all']:.3f}) "
            f"| {error} "
            f"| {row['wall_s_median']:.1f} ({row['wall_s_min']:.1f}-{row['wall_s_max']:.1f}) "
            f"| {row['peak_rss_gb']:.2f} |")
        if "dice_tool" in row and abs(row["dice_tool"] - row["dice_after"]) > 0.02:
            warnings.append(f"{row['pair']} / {row['method']}: Dice from the tool's own label "
                            f"warp {row['dice_tool']:.3f} differs from the field's "
                            f"{row['dice_after']:.3f} (check transform conventions)")
        if row["ok"] < row["runs"]:
            warnings.append(f"{row['pair']} / {row['method']}: {row['runs'] - row['ok']} of "
                            f"{row['runs']} runs failed")
    lines += ["", "Dice: mean over CSF, GM, WM of the moving labels pulled onto the fixed grid "
              "through each method's forward transform (nearest neighbour); (truth): through the "
              "true mapping, the ceiling that resampling the labels leaves. Folding: voxels "
              "with a non-positive Jacobian determinant of that mapping, inside the fixed "
              "brain (whole grid). Error: distance between the estimated and the true "
              "fixed-to-moving mapping over the fixed brain; on pairs marked (affine) it is "
              "the affine error. Wall time and peak RSS: the whole method process."]
    for name, reason in results["skipped"].items():
        warnings.append(f"{name} skipped: {reason}")
    if warnings:
        lines += [""] + [f"* {w}" for w in warnings]
    return "\n".join(lines) + "\n"
