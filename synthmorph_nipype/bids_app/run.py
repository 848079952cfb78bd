"""What each analysis level does, given parsed arguments."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .. import __version__
from ..errors import SynthMorphError
from .derivatives import sha256, write_dataset_description
from .inputs import (
    EXIT,
    BIDSAppError,
    check_output_dir,
    index_dataset,
    read_filters,
    select_units,
)

LOGGER = logging.getLogger("synthmorph_bids")


def _weights_info(mode: str, weights: list[str] | None) -> tuple[list[str], dict, object]:
    """The weight files a run uses (found now, so every node uses the same), what the
    sidecars say of them, and the models' settings (the refinement they recommend, a
    lambda head). Our ``.pt`` files are small and loaded here; FreeSurfer's ``.h5`` are
    not (their hypernetwork costs GBs and recommends nothing), only checked to exist."""
    from ..engine.weights import Models, find_weights, load_models

    try:
        files = [str(f) for f in find_weights(mode, weights)]
        for f in files:
            if not Path(f).is_file():
                raise BIDSAppError(f"{f}: weights file not found", "no_weights")
        keras = any(not f.endswith((".pt", ".pth")) for f in files)
        models = Models() if keras else load_models(mode, [Path(f) for f in files])
    except SynthMorphError as err:
        raise BIDSAppError(str(err), "no_weights") from None
    return files, {"Model": [Path(f).name for f in files],
                   "ModelSHA256": [sha256(f)[:16] for f in files]}, models


def _omp(args) -> int:
    return args.omp_nthreads or max(1, min(8, args.nprocs - 1))


def run_participant(args) -> int:
    """The participant level: check the dataset and output folder, select the units,
    build :func:`~synthmorph_nipype.bids_app.workflow.init_synthmorph_bids_wf` and run it
    with the chosen Nipype plugin; 0, or ``some_skipped`` when units were left out."""
    from ..io.templates import resolve_template
    from .workflow import init_synthmorph_bids_wf

    # every check before anything is written
    layout = index_dataset(args.bids_dir, validate=not args.skip_bids_validation)
    output_dir = check_output_dir(args.bids_dir, args.output_dir)
    skipped: list[str] = []
    units = select_units(layout, participants=args.participant_label,
                         sessions=args.session_label, contrasts=args.contrasts,
                         filters=read_filters(args.bids_filter_file), skipped=skipped)
    plugin, plugin_args = plugin_settings(args)
    weights, info, models = _weights_info(args.mode, args.weights)
    # the refinement is pinned now (given, or what the weights recommend): every node runs
    # the same, and the sidecars say what ran
    refine = models.refine if args.refine is None else args.refine
    refine_affine = models.refine_affine if args.refine_affine is None else args.refine_affine
    similarity = args.refine_similarity or models.refine_similarity
    refine_lambda = (models.refine_weight(args.regularization) if args.refine_lambda is None
                     else args.refine_lambda)
    passes = models.cascade(refine) if args.passes is None else args.passes
    work = Path(args.work_dir).resolve()
    try:
        template = resolve_template(args.template, work / "templates")
    except SynthMorphError as err:
        raise BIDSAppError(str(err), "bad_template") from None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BIDSAppError(f"{args.output_dir}: cannot create the output directory "
                           f"({err.strerror})", "unwritable_output") from None
    write_dataset_description(output_dir, args.bids_dir)
    wf = init_synthmorph_bids_wf(
        units=units, template=template, output_dir=output_dir, bids_dir=args.bids_dir,
        mode=args.mode, regularization=args.regularization, weights=weights,
        weights_info=info, use_gpu=args.use_gpu, omp_nthreads=_omp(args),
        extent=args.extent, refine=refine, refine_similarity=similarity,
        refine_affine=refine_affine, refine_lambda=refine_lambda, passes=passes,
        write_lambda=models.deform is not None and models.deform.config.lambda_head)
    wf.base_dir = str(work)
    crashdir = output_dir / "logs"
    wf.config["execution"].update({
        "crashdump_dir": str(crashdir), "crashfile_format": "txt",
        "stop_on_first_crash": args.stop_on_first_crash})
    if plugin in ("SLURM", "SLURMGraph") and "LOGNAME" not in os.environ:
        os.environ["LOGNAME"] = os.environ.get("USER", "synthmorph")
    LOGGER.info("%d unit(s): %s; template %s (%s); %s on %s", len(units),
                ", ".join(u.label for u in units), template.name, template.source,
                args.mode, plugin)
    start = time.monotonic()
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "a node failed"
        raise BIDSAppError(f"{first} (crash files in {crashdir})", "workflow_failed") from None
    LOGGER.info("participant level done in %.1f s; reports: %s", time.monotonic() - start,
                ", ".join(str(output_dir / f"{u.label}.html") for u in units))
    if skipped:
        LOGGER.warning("%d unit(s) skipped (see the warnings above): %s", len(skipped),
                       ", ".join(skipped))
        return EXIT["some_skipped"]
    return 0


def run_group(args) -> int:
    """The group level: ``group_summary.tsv`` and ``group_report.html`` from the
    participant summaries in the output folder."""
    from .reports import write_group_report

    out = Path(args.output_dir)
    if not (out / "dataset_description.json").is_file():
        raise BIDSAppError(f"{args.output_dir}: no participant-level results here "
                           "(run the participant level first)", "no_participants")
    tsv, page, n_out = write_group_report(out, __version__)
    LOGGER.info("group report: %s (%s); %d outlier(s)", page, tsv.name, n_out)
    return 0


def plugin_settings(args) -> tuple[str, dict]:
    """The Nipype plugin and its arguments from the command line or ``--use-plugin``."""
    if args.use_plugin:
        import yaml

        try:
            data = yaml.safe_load(Path(args.use_plugin).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise BIDSAppError(f"{args.use_plugin}: not a readable plugin file ({err})",
                               "bad_filter") from None
        if not isinstance(data, dict) or "plugin" not in data:
            raise BIDSAppError(f"{args.use_plugin}: needs a 'plugin' key", "bad_filter")
        from nipype.pipeline import plugins

        if not hasattr(plugins, f"{data['plugin']}Plugin"):
            raise BIDSAppError(f"{args.use_plugin}: unknown Nipype plugin "
                               f"{data['plugin']!r}", "bad_filter")
        return str(data["plugin"]), dict(data.get("plugin_args") or {})
    plugin_args = {"n_procs": args.nprocs, "raise_insufficient": False}
    if args.mem:
        plugin_args["memory_gb"] = args.mem
    return ("MultiProc" if args.nprocs > 1 else "Linear"), plugin_args
