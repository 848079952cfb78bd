"""The participant-level workflow: per subject (and session), the reference anatomical
image to the template, the other contrasts onto the reference, derivatives and a report.

All subjects go into one Nipype workflow, so MultiProc or a batch plugin runs them in
parallel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from .. import __version__
from ..io.templates import Template
from ..vocabulary import DEFORM_MODES, fine_steps
from ..workflows import init_coregister_wf, init_synthmorph_wf
from .derivatives import DerivativeSink
from .inputs import Unit


def init_synthmorph_bids_wf(
    *,
    units: Sequence[Unit],
    template: Template,
    output_dir: str | Path,
    bids_dir: str | Path,
    mode: str = "joint",
    regularization: float = 0.5,
    weights: Sequence[str] | None = None,
    weights_info: dict | None = None,
    use_gpu: bool = False,
    omp_nthreads: int = 1,
    extent: int = 256,
    refine: int = 0,
    refine_similarity: str = "ncc",
    refine_affine: int = 0,
    refine_lambda: float = 0.5,
    passes: int = 1,
    write_lambda: bool = False,
    name: str = "synthmorph_bids_wf",
) -> pe.Workflow:
    """All participants of a run, one sub-workflow each (``single_<label>_wf``).

    Parameters
    ----------
    units : sequence of Unit
        The (subject, session) selections of
        :func:`~synthmorph_nipype.bids_app.inputs.select_units`.
    template : Template
        The resolved registration template.
    output_dir, bids_dir : str or Path
        Derivatives root and raw dataset root.
    mode, regularization, weights, use_gpu, omp_nthreads, extent : various
        Registration settings (see :func:`~synthmorph_nipype.workflows.init_synthmorph_wf`).
    refine, refine_similarity, refine_affine, refine_lambda, passes, write_lambda : various
        Network, refinement and output settings, as for the same function.
    weights_info : dict, optional
        What the sidecars record about the model (name, checksum).
    """
    workflow = pe.Workflow(name=name)
    for unit in units:
        workflow.add_nodes([init_single_unit_wf(
            unit=unit, template=template, output_dir=output_dir, bids_dir=bids_dir,
            mode=mode, regularization=regularization, weights=weights,
            weights_info=weights_info or {}, use_gpu=use_gpu, omp_nthreads=omp_nthreads,
            extent=extent, refine=refine, refine_similarity=refine_similarity,
            refine_affine=refine_affine, refine_lambda=refine_lambda, passes=passes,
            write_lambda=write_lambda)])
    return workflow


def _resolution(template, entities: dict) -> dict:
    """The ``Resolution`` sidecar entry a ``res-`` entity needs (empty without one)."""
    if "res" not in entities:
        return {}
    import nibabel as nb

    zooms = nb.load(str(template.t1w)).header.get_zooms()[:3]
    size = " x ".join(f"{z:g}" for z in zooms)
    return {"Resolution": {str(entities["res"]): f"the {size} mm grid of {template.name}'s "
                           f"res-{entities['res']} template"}}


def _bids_uri(path, bids_dir) -> str:
    """``bids:raw:`` URI of a file of the raw dataset (the path itself elsewhere)."""
    path, root = Path(path).resolve(), Path(bids_dir).resolve()
    return f"bids:raw:{path.relative_to(root)}" if root in path.parents else str(path)


def _sink(name: str, output_dir, bids_dir, entities: dict, sources, metadata=None):
    return pe.Node(DerivativeSink(output_dir=str(output_dir), bids_dir=str(bids_dir),
                                  entities=entities, source_file=sources,
                                  metadata=metadata or {}),
                   name=name, run_without_submitting=True,
                   overwrite=True)  # always run: a rerun restores removed derivatives


def init_single_unit_wf(*, unit: Unit, template: Template, output_dir, bids_dir, mode: str,
                        regularization: float, weights, weights_info: dict, use_gpu: bool,
                        omp_nthreads: int, extent: int, refine: int = 0,
                        refine_similarity: str = "ncc", refine_affine: int = 0,
                        refine_lambda: float = 0.5, passes: int = 1,
                        write_lambda: bool = False) -> pe.Workflow:
    """One subject/session: registration to the template, co-registrations, derivatives
    and the report."""
    workflow = pe.Workflow(name=f"single_{unit.label.replace('-', '_')}_wf")
    ref = unit.reference_contrast
    tpl_ent = {"res": template.spec["res"]} if "res" in template.spec else {}
    # the matrix refinement is MIND whatever the weights (engine.refine.refine_matrix)
    affine_refinement = ({"AffineRefinement": {"Steps": refine_affine, "Similarity": "mind"}}
                         if refine_affine else {})
    reg_meta = {"Mode": mode, "Extent": extent, "Template": template.name,
                "TemplateSource": template.source, "SoftwareVersion": __version__,
                **({"Regularization": regularization} if mode in DEFORM_MODES else {}),
                **({"NetworkPasses": passes} if mode in DEFORM_MODES else {}),
                **({"Refinement": {"Steps": refine, "FineSteps": fine_steps(refine),
                                   "Similarity": refine_similarity,
                                   "Lambda": refine_lambda}}
                   if refine and mode in DEFORM_MODES else {}),
                **(affine_refinement if mode != "deform" else {}),
                **({"RefinementMask": {"Fixed": Path(template.mask).name}}
                   if template.mask else {}),
                **weights_info}
    reg_wf = init_synthmorph_wf(mode=mode, use_gpu=use_gpu, omp_nthreads=omp_nthreads,
                                extent=extent, regularization=regularization,
                                weights=weights, refine=refine,
                                refine_similarity=refine_similarity,
                                refine_affine=refine_affine, refine_lambda=refine_lambda,
                                passes=passes if mode in DEFORM_MODES else None,
                                write_lambda=write_lambda and mode in DEFORM_MODES,
                                name="template_reg_wf")
    reg_wf.inputs.inputnode.moving_image = unit.reference
    reg_wf.inputs.inputnode.fixed_image = template.t1w
    if template.mask:  # the refinements' similarity counts the template's brain only
        reg_wf.inputs.inputnode.fixed_mask = template.mask
    ext = ".h5"  # fMRIPrep looks for .h5 composites, affine ones included
    to_h5 = pe.Node(niu.Function(function=_as_itk_h5, input_names=["forward", "inverse"],
                                 output_names=["forward", "inverse"]), name="to_h5")
    # what the validator requires of a resampled anatomical image: whether it was
    # skull-stripped (not by us: the input's skull, if any, is kept), and the meaning of
    # the res- entity
    image_meta = {**reg_meta, "SkullStripped": False, **_resolution(template, tpl_ent)}
    sinks = {
        "fwd": _sink("ds_anat2std_xfm", output_dir, bids_dir,
                     {**unit.entities, "from": ref, "to": template.name, "mode": "image",
                      "suffix": "xfm", "extension": ext}, [unit.reference], reg_meta),
        "inv": _sink("ds_std2anat_xfm", output_dir, bids_dir,
                     {**unit.entities, "from": template.name, "to": ref, "mode": "image",
                      "suffix": "xfm", "extension": ext}, [unit.reference], reg_meta),
        "moved": _sink("ds_std_preproc", output_dir, bids_dir,
                       {**unit.entities, "space": template.name, **tpl_ent, "desc": "preproc",
                        "suffix": ref}, [unit.reference], image_meta),
    }
    workflow.connect([
        (reg_wf, to_h5, [("outputnode.forward_transform", "forward"),
                         ("outputnode.inverse_transform", "inverse")]),
        (to_h5, sinks["fwd"], [("forward", "in_file")]),
        (to_h5, sinks["inv"], [("inverse", "in_file")]),
        (reg_wf, sinks["moved"], [("outputnode.moved_image", "in_file")]),
    ])
    if write_lambda and mode in DEFORM_MODES:  # the weight map, in template space
        ds_lambda = _sink("ds_std_lambda", output_dir, bids_dir,
                          {**unit.entities, "space": template.name, **tpl_ent,
                           "desc": "lambda", "suffix": ref}, [unit.reference],
                          {**image_meta, "Description": "voxel-wise regularisation weight "
                           "of the spatially varying model, in (0, 1]"})
        workflow.connect(reg_wf, "outputnode.lambda_map", ds_lambda, "in_file")
    report = pe.Node(niu.Function(function=_report, output_names=["out_report"]),
                     name="report", run_without_submitting=True,
                     overwrite=True)  # like the sinks: a rerun restores the report
    report.inputs.unit_label = unit.label
    report.inputs.info = {
        "participant": unit.subject, "session": unit.session or "n/a", "reference": ref,
        "template": template.name, "mode": mode,
        "lambda": regularization if mode in DEFORM_MODES else "n/a",
        "weights": weights_info.get("Model", "n/a"), "version": __version__}
    report.inputs.output_dir = str(output_dir)
    report.inputs.subject_dir = str(Path(output_dir) / f"sub-{unit.subject}")
    report.inputs.original = unit.reference
    report.inputs.template_t1w = template.t1w
    report.inputs.template_mask = template.mask
    reg_nodes = [n for n in (reg_wf.get_node("affine_reg"), reg_wf.get_node("deform_reg"))
                 if n is not None]
    timing = pe.Node(niu.Merge(len(reg_nodes)), name="timing", run_without_submitting=True)
    workflow.connect([
        (reg_wf, report, [("outputnode.moved_image", "moved")]),
        (to_h5, report, [("forward", "forward")]),
        (reg_nodes[-1], report, [("device", "device")]),
        (timing, report, [("out", "elapsed_s")]),
    ])
    for k, node in enumerate(reg_nodes):
        workflow.connect(node, "elapsed_s", timing, f"in{k + 1}")

    coreg_inputs = pe.Node(niu.Merge(max(1, len(unit.others))), name="coreg_moved",
                           run_without_submitting=True)
    for k, (contrast, path) in enumerate(sorted(unit.others.items())):
        co_wf = init_coregister_wf(mode="rigid", use_gpu=use_gpu, omp_nthreads=omp_nthreads,
                                   extent=extent, weights=weights,
                                   refine_affine=refine_affine,
                                   name=f"coreg_{contrast.lower()}_wf")
        co_wf.inputs.inputnode.moving_image = path
        co_wf.inputs.inputnode.fixed_image = unit.reference
        meta = {"Mode": "rigid", "Extent": extent, "SoftwareVersion": __version__,
                **affine_refinement,
                **weights_info}
        ds_xfm = _sink(f"ds_{contrast.lower()}_xfm", output_dir, bids_dir,
                       {**unit.entities, "from": contrast, "to": ref, "mode": "image",
                        "suffix": "xfm", "extension": ".txt"}, [path, unit.reference], meta)
        ds_img = _sink(f"ds_{contrast.lower()}_preproc", output_dir, bids_dir,
                       {**unit.entities, "space": ref, "desc": "preproc", "suffix": contrast},
                       [path, unit.reference],
                       {**meta, "SkullStripped": False,
                        "SpatialReference": _bids_uri(unit.reference, bids_dir)})
        workflow.connect([
            (co_wf, ds_xfm, [("outputnode.forward_transform", "in_file")]),
            (co_wf, ds_img, [("outputnode.moved_image", "in_file")]),
            (co_wf, coreg_inputs, [("outputnode.moved_image", f"in{k + 1}")]),
        ])
    report.inputs.coreg_names = sorted(unit.others)
    if unit.others:
        workflow.connect(coreg_inputs, "out", report, "coreg_moved")
    else:
        report.inputs.coreg_moved = []
    return workflow


def _as_itk_h5(forward, inverse):
    """Transforms as ITK ``.h5`` (composites pass through; affine ``.txt`` converted)."""
    import os

    from synthmorph_nipype.transforms.io import load_transform, save_transform

    out = []
    for path in (forward, inverse):
        if path.endswith(".h5"):
            out.append(path)
            continue
        dst = os.path.abspath(os.path.basename(path).rsplit(".", 1)[0] + ".h5")
        save_transform(dst, load_transform(path).chain)
        out.append(dst)
    return tuple(out)


def _report(unit_label, info, output_dir, subject_dir, original, moved, forward,
            template_t1w, template_mask, elapsed_s, device, coreg_names, coreg_moved):
    """Figures, numbers and the HTML page of one unit; its summary JSON for the group."""
    import json
    import os
    from pathlib import Path

    from synthmorph_nipype.bids_app.reports import (
        flicker_reportlet,
        folding_pct,
        similarity,
        write_subject_report,
    )
    from synthmorph_nipype.io.atomic import atomic_write_text

    subj = Path(subject_dir)
    figs = subj / "figures"
    ref = info["reference"]
    figures = [
        (f"Registration of the {ref} to the template {info['template']} (outline: the "
         "template's brain mask)",
         flicker_reportlet(template_t1w, moved, figs / f"{unit_label}_desc-std_{ref}.svg",
                           labels=("template", f"registered {ref}"),
                           contour=template_mask)),
    ]
    for name, path in zip(coreg_names, coreg_moved, strict=True):
        svg = figs / f"{unit_label}_desc-coreg_{name}.svg"
        figures.append((f"Co-registration of the {name} to the {ref}",
                        flicker_reportlet(original, path, svg, labels=(ref, name))))
    summary = {"unit": unit_label, **info, "device": device,
               "registration_s": round(sum(float(t) for t in elapsed_s), 2),
               "similarity": round(similarity(moved, template_t1w, template_mask), 4),
               "folding_pct": round(folding_pct(forward), 4)}
    log = subj / "log" / f"{unit_label}_summary.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(log, json.dumps(summary, indent=2))
    rel = [(c, os.path.relpath(p, output_dir)) for c, p in figures]
    return str(write_subject_report(Path(output_dir) / f"{unit_label}.html", summary, rel,
                                    info["version"]))
