"""Argument parsing for ``synthmorph``, flags modelled on FreeSurfer's ``mri_synthmorph``."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..vocabulary import DETECTOR_MODES, IMAGE_SIMILARITIES, MODES, TRAINED_MODELS
from .arguments import (
    MAX_STEPS,
    Parser,
    extent,
    integration_steps,
    non_negative,
    positive,
    regularization,
)


def build_parser() -> Parser:
    """The parser of ``synthmorph`` and its subcommands (flags of ``mri_synthmorph``)."""
    parser = Parser(prog="synthmorph", description=(
        "SynthMorph registration of brain images of any contrast, in PyTorch."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    reg = sub.add_parser("register", help="register a moving image to a fixed image",
                         description=(
        "Register MOVING to FIXED. Transform formats follow the file name: .h5 (ITK "
        "composite), .txt/.mat (ITK affine), .lta (FreeSurfer), .nii/.nii.gz (ITK "
        "displacement field). -t maps as ITK/antsApplyTransforms expects for resampling "
        "MOVING onto FIXED; -T is its inverse."))
    reg.add_argument("moving", metavar="MOVING")
    reg.add_argument("fixed", metavar="FIXED")
    reg.add_argument("-m", "--model", dest="mode", default="joint",
                     choices=MODES,
                     help="transformation model (default: joint)")
    reg.add_argument("-o", "--out-moving", metavar="MOVED", help="MOVING resampled onto FIXED")
    reg.add_argument("-O", "--out-fixed", metavar="FIXED_MOVED",
                     help="FIXED resampled onto MOVING")
    reg.add_argument("-t", "--trans", metavar="FWD", action="append",
                     help="output transform, MOVING to FIXED; repeat for several formats")
    reg.add_argument("-T", "--inverse", metavar="INV", action="append",
                     help="output inverse transform; repeat for several formats")
    reg.add_argument("--out-lambda", metavar="LAMBDA_MAP",
                     help="models with spatially varying regularisation: write their "
                     "voxel-wise regularisation weight on FIXED's grid")
    reg.add_argument("-H", "--header-only", action="store_true",
                     help="-o/-O by changing the header, no resampling (affine, rigid)")
    reg.add_argument("-i", "--init", metavar="INIT", help="initial affine transform (any format)")
    reg.add_argument("-x", "--fixed-mask", metavar="MASK",
                     help="the test-time refinements count the similarity only inside this "
                     "mask of FIXED (non-zero voxels, any grid; dilated by 4 mm), as ANTs' "
                     "-x: e.g. a brain mask against a head")
    reg.add_argument("--moving-mask", metavar="MASK", help="the same for MOVING")
    reg.add_argument("-r", "--regularization", dest="lam", type=regularization, default=None,
                     metavar="LAMBDA", help="regularization weight in (0, 1) of the network "
                     "(hyper-networks), and of the refinement when the weights recommend "
                     "none (default: 0.5)")
    reg.add_argument("-n", "--steps", type=integration_steps, default=7,
                     help=f"integration steps, 0..{MAX_STEPS} (default: 7)")
    reg.add_argument("-e", "--extent", type=extent, default=256,
                     help="isotropic network extent, 192 or 256 (default: 256)")
    reg.add_argument("-w", "--weights", action="append", metavar="WEIGHTS",
                     help="model weights, .h5 (FreeSurfer/Keras) or .pt; repeatable")
    reg.add_argument("-j", "--threads", type=positive, metavar="N",
                     help="CPU threads (default: all cores)")
    reg.add_argument("--passes", type=positive, metavar="N",
                     help="deformable modes: run the deformable network N times as a "
                     "cascade, each run on the images warped by the runs before (default: "
                     "what the weights recommend for a refined or an unrefined field - the "
                     "embedded models' model card; 1 for FreeSurfer's)")
    reg.add_argument("--refine", type=non_negative, metavar="N",
                     help="deformable modes: optimise the predicted field on the pair for N "
                     "steps on a 4 mm grid, then N/4 at 2 mm (test-time refinement; "
                     "default: what the weights "
                     "recommend - the embedded models' model card; 0 for FreeSurfer's)")
    reg.add_argument("--refine-similarity", choices=IMAGE_SIMILARITIES,
                     help="image similarity of the refinement: local NCC, MSE, or across "
                     "contrasts MIND, mutual information (mi) or both (mind+mi) (default: "
                     "what the weights recommend, else ncc)")
    reg.add_argument("--refine-lambda", type=regularization, metavar="LAMBDA",
                     help="smoothness weight in (0, 1) of the refinement's objective "
                     "(1 - LAMBDA) * dissimilarity + LAMBDA * Grad-l2 (default: what the "
                     "weights recommend, else -r)")
    reg.add_argument("--refine-affine", type=non_negative, metavar="N",
                     help="affine, rigid and joint modes: optimise the predicted matrix on "
                     "the pair for N steps at 4 mm, then N/2 at 2 mm, on a MIND similarity; "
                     "default: what the weights recommend (the embedded models' model card; "
                     "0 for FreeSurfer's)")
    dev = reg.add_mutually_exclusive_group()
    dev.add_argument("-g", "--gpu", action="store_true",
                     help="run on the GPU (CUDA); by default it is used when present")
    dev.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is present")

    app = sub.add_parser("apply", help="apply a transform to images", description=(
        "Resample each INPUT through TRANSFORM and write OUTPUT. Any format register "
        "writes is accepted. The output grid is --reference, or the one the transform "
        "file names (LTA destination, displacement-field grid)."))
    app.add_argument("transform", metavar="TRANSFORM")
    app.add_argument("pairs", nargs="+", metavar="INPUT OUTPUT")
    app.add_argument("-m", "--method", default="linear", choices=("linear", "nearest"),
                     help="interpolation (default: linear; nearest keeps labels)")
    app.add_argument("--reference", metavar="FIXED", help="output grid image")
    app.add_argument("-t", "--type", dest="dtype", metavar="DTYPE",
                     choices=("uint8", "uint16", "int16", "int32", "float32", "float64"),
                     help="output data type (default: the input's)")
    app.add_argument("-f", "--fill", type=float, default=0.0, help="value outside (default: 0)")
    app.add_argument("-H", "--header-only", action="store_true",
                     help="change the header only (affine transforms)")

    demo = sub.add_parser("demo", help="make a pair with a known transform and register it",
                          description=(
        "Write a registration problem with a known answer, made from the template nilearn "
        "ships (fixed: the template; moving: re-contrasted, oblique, anisotropic, moved by a "
        "known affine), register it with the installed or given weights, and report the "
        "error against the truth."))
    demo.add_argument("outdir", metavar="OUTDIR")
    demo.add_argument("-m", "--model", dest="mode", default="affine",
                      choices=DETECTOR_MODES)
    demo.add_argument("-e", "--extent", type=extent, default=256)
    demo.add_argument("-w", "--weights", action="append", metavar="WEIGHTS")
    demo.add_argument("-j", "--threads", type=positive, metavar="N")
    demo.add_argument("-g", "--gpu", action="store_true")

    syn = sub.add_parser("synth", help="write synthetic training pairs to look at",
                         description=(
        "Write COUNT synthetic image pairs and their label maps as NIfTI, drawn as "
        "training draws them (label maps from the configuration's --label-maps, else the "
        "nilearn template, and random shapes)."))
    syn.add_argument("outdir", metavar="OUTDIR")
    syn.add_argument("--label-maps", metavar="DIR_OR_FILE", nargs="+",
                     help="whole-head label maps of real subjects (see train)")
    syn.add_argument("-n", "--count", type=positive, default=4, help="pairs (default: 4)")
    syn.add_argument("--model", default="affine", choices=TRAINED_MODELS,
                     help="whose synthesis ranges to use (default: affine)")
    syn.add_argument("--config", metavar="FILE", help="training configuration (.toml/.json)")
    syn.add_argument("--seed", type=non_negative, default=None)
    syn.add_argument("-j", "--threads", type=positive, metavar="N")

    tr = sub.add_parser("train", help="train a model on synthetic data", description=(
        "Train an affine, rigid or joint (deformable) model from synthetic pairs alone. "
        "Resumes from OUT/checkpoint.pt when it exists; writes OUT/model.pt for -w, "
        "train.csv, val.csv and log.jsonl."))
    tr.add_argument("--model", choices=TRAINED_MODELS, default=None,
                    help="model to train (default: the configuration's, else joint)")
    tr.add_argument("--config", metavar="FILE", help="training configuration (.toml/.json)")
    tr.add_argument("--out", required=True, metavar="DIR", help="output directory")
    tr.add_argument("--steps", type=non_negative, default=None, help="total optimizer steps")
    tr.add_argument("--seed", type=non_negative, default=None)
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    tr.add_argument("-j", "--threads", type=positive, metavar="N")
    tr.add_argument("--affine-weights", metavar="PT",
                    help="joint: affine model .pt to bundle into the exported model")
    tr.add_argument("--objective", choices=("synthetic", "similarity"), default=None,
                    help="synthetic label maps (SynthMorph, default) or your own images "
                    "with an image similarity (VoxelMorph-style fine-tuning)")
    tr.add_argument("--images", metavar="DIR_OR_BIDS",
                    help="similarity objective: a folder, BIDS dataset or list of images")
    tr.add_argument("--init-weights", metavar="WEIGHTS", nargs="+",
                    help="start from these weights: for the similarity objective a joint "
                    "model (the embedded .pt, or FreeSurfer's synthmorph.affine.2.h5 "
                    "synthmorph.deform.3.h5) whose detector aligns the pairs; for "
                    "synthetic training a .pt of the same widths (e.g. the embedded one)")
    tr.add_argument("--label-maps", metavar="DIR_OR_FILE", nargs="+",
                    help="whole-head label maps of real subjects (NIfTI/MGZ, FreeSurfer "
                    "labels; folders, files or glob patterns) to synthesise brains from "
                    "instead of the nilearn template")
    tr.add_argument("--similarity", choices=("label_mse", "dice", *IMAGE_SIMILARITIES),
                    default=None, help="training similarity (images: ncc, mse or mind)")
    tr.add_argument("--spatial-lambda", action="store_true",
                    help="joint: spatially varying regularisation (a voxel-wise lambda head "
                    "instead of the hypernetwork; Chen et al.)")
    tr.add_argument("--prior-alpha", type=float, metavar="ALPHA",
                    help="spatial lambda: alpha of the Beta(alpha, 1) prior (default 1.1)")
    tr.add_argument("--penalty-weight", type=float, metavar="W",
                    help="spatial lambda: weight of the lambda-weighted gradient penalty "
                    "(default 1)")
    tr.add_argument("--max-minutes", type=float, metavar="M",
                    help="stop (checkpoint and export) after M minutes; run again to resume")
    tr.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def parse(argv=None) -> argparse.Namespace:
    """Parsed arguments of ``synthmorph`` (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "apply" and len(args.pairs) % 2:
        parser.exit(2, "synthmorph apply: error: inputs and outputs must come in pairs\n")
    if args.command == "register":  # -t/-T repeat: one file per format
        args.trans, args.inverse = args.trans or [], args.inverse or []
    return args
