"""Workflows run for real: Linear and MultiProc plugins (GPU nodes on this CPU-only host
through ``n_gpu_procs`` / ``raise_insufficient``), cache reuse, a SIGKILL mid-run, and the
SLURM plugin against a one-node cluster that ``scripts/slurm_cluster.sh`` starts.

Registrations use tiny random weights at extent 192 on the 2 mm template: the transforms
are arbitrary, so the checks are about plumbing and geometry that independent readers
(SimpleITK, nitransforms) confirm, and about what the schedulers did.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nibabel as nb
import nitransforms as nt
import numpy as np
import pytest
import SimpleITK as sitk
from nipype.pipeline import engine as pe

from synthmorph_nipype.ops.rotation import rotation
from synthmorph_nipype.workflows import (
    init_coregister_wf,
    init_register_template_wf,
    init_synthmorph_wf,
)
from synthmorph_nipype.workflows.template import INPUT_FIELDS, OUTPUT_FIELDS

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:Reference space not set")]  # nitransforms
ROOT = Path(__file__).resolve().parents[1]


def sitk_resample(moving: Path, reference: Path, xfm: Path):
    out = sitk.Resample(sitk.ReadImage(str(moving), sitk.sitkFloat64),
                        sitk.ReadImage(str(reference)), sitk.ReadTransform(str(xfm)),
                        sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def node_results(graph_result) -> dict[str, object]:
    """``{node directory name: nipype result}`` of an executed graph."""
    return {Path(n.output_dir()).name if n.parameterization else n.name: n.result
            for n in graph_result.nodes()}


def intervals(graph_result, prefix: str) -> list[tuple[datetime, datetime]]:
    out = []
    for node in graph_result.nodes():
        if node.name.startswith(prefix):
            rt = node.result.runtime
            out.append((datetime.fromisoformat(rt.startTime), datetime.fromisoformat(rt.endTime)))
    return sorted(out)


def overlapping(spans) -> bool:
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


@pytest.fixture(scope="module")
def movings(nipype_pair, tmp_path_factory) -> list[str]:
    """Four moving images: the template data under four different headers."""
    root = tmp_path_factory.mktemp("movings")
    out = [str(nipype_pair["moving"]), str(nipype_pair["moving_2"])]
    img = nb.load(nipype_pair["fixed"])
    for k, (rot, shift) in enumerate((((3, 0, -4), (2, 2, -3)), ((0, -5, 2), (-3, 4, 1)))):
        move = np.eye(4)
        move[:3, :3], move[:3, 3] = rotation(rot), shift
        path = root / f"moving_{k + 3}.nii.gz"
        nb.save(nb.Nifti1Image(np.asarray(img.dataobj), move @ img.affine), path)
        out.append(str(path))
    return out


def four_affine_wf(pair, movings, base: Path, **kwargs) -> pe.Workflow:
    wf = init_synthmorph_wf(mode="affine", extent=192, weights=[str(pair["weights"])],
                            **kwargs)
    wf.base_dir = str(base)
    inputnode = wf.get_node("inputnode")
    inputnode.iterables = ("moving_image", movings)
    inputnode.inputs.fixed_image = str(pair["fixed"])
    return wf


def outputs_of(base: Path) -> dict[str, tuple]:
    """Forward matrix and moved image data of each registration under ``base``."""
    out = {}
    for xfm in sorted(base.rglob("affine_reg/fwd_xfm.txt")):
        key = xfm.parent.parent.name
        params = sitk.ReadTransform(str(xfm)).GetParameters()
        out[key] = (np.array(params), nb.load(xfm.parent / "moved.nii.gz").get_fdata())
    return out


# ------------------------------------------------------------------------ workflows
def test_joint_workflow_chains_the_affine_into_one_composite(nipype_pair, tmp_path):
    wf = init_synthmorph_wf(mode="joint", extent=192, weights=[str(nipype_pair["weights"])])
    wf.base_dir = str(tmp_path)
    wf.inputs.inputnode.moving_image = str(nipype_pair["moving"])
    wf.inputs.inputnode.moving_mask = str(nipype_pair["mask"])
    wf.inputs.inputnode.fixed_image = str(nipype_pair["fixed"])
    res = node_results(wf.run())
    affine = res["affine_reg"].outputs.forward_transform
    fwd = res["deform_reg"].outputs.forward_transform
    comp = sitk.CompositeTransform(sitk.ReadTransform(fwd))
    assert comp.GetNumberOfTransforms() == 2
    assert np.allclose(comp.GetNthTransform(0).GetParameters(),
                       sitk.ReadTransform(affine).GetParameters(), atol=1e-5)
    # the mask reaches both registrations as a similarity mask; nothing is skull-stripped
    for name in ("affine_reg", "deform_reg"):
        assert res[name].inputs["moving_mask"] == str(nipype_pair["mask"])
        assert res[name].inputs["moving_image"] == str(nipype_pair["moving"])
    moved = nb.load(res["deform_reg"].outputs.moved_image).get_fdata()
    assert corr(sitk_resample(nipype_pair["moving"], nipype_pair["fixed"], fwd), moved) > 0.99
    inv = res["deform_reg"].outputs.inverse_transform
    assert sitk.CompositeTransform(sitk.ReadTransform(inv)).GetNumberOfTransforms() == 2


def test_register_template_wf_is_a_smriprep_drop_in(nipype_pair, tmp_path):
    user_tpl = tmp_path / "tpl-Custom_T1w.nii.gz"
    shutil.copy(nipype_pair["fixed"], user_tpl)
    wf = init_register_template_wf(templates=["MNI152NLin2009aSym:res-2", str(user_tpl)],
                                   mode="affine", extent=192,
                                   weights=[str(nipype_pair["weights"])])
    assert wf._tag == "anat.register-template"
    assert set(wf.get_node("inputnode").inputs.copyable_trait_names()) == set(INPUT_FIELDS)
    for name in ("outputnode", "poutputnode"):
        assert set(wf.get_node(name).outputs.copyable_trait_names()) == set(OUTPUT_FIELDS)
    wf.base_dir = str(tmp_path)
    wf.inputs.inputnode.moving_image = str(nipype_pair["moving"])
    wf.inputs.inputnode.moving_mask = str(nipype_pair["mask"])
    wf.inputs.inputnode.lesion_mask = str(nipype_pair["mask"])  # accepted, ignored
    res = wf.run()
    joined = next(n for n in res.nodes() if n.name == "outputnode").result.outputs
    assert joined.template == ["MNI152NLin2009aSym", "Custom"]
    assert joined.template_spec == [{"res": "2"}, {}]
    t1w = {n.result.outputs.name: n.result.outputs.t1w_file for n in res.nodes()
           if n.name == "tpl_source"}
    assert t1w["Custom"] == str(user_tpl)
    for fwd, inv, name in zip(joined.anat2std_xfm, joined.std2anat_xfm, joined.template,
                              strict=True):
        a = nt.linear.load(fwd, fmt="itk").matrix
        b = nt.linear.load(inv, fmt="itk").matrix
        assert np.allclose(a @ b, np.eye(4), atol=1e-4)
        moved, grid = nb.load(Path(fwd).parent / "moved.nii.gz"), nb.load(t1w[name])
        assert moved.shape == grid.shape and np.allclose(moved.affine, grid.affine)
    # the template's brain mask (only the nilearn template has one) and the moving mask
    # restrict the refinement's similarity; the template itself is registered whole
    regs = [n for n in res.nodes() if n.name == "affine_reg"]
    masks = sorted(str(n.inputs.fixed_mask) for n in regs)
    assert len(regs) == 2 and masks[1] == "None" and masks[0].endswith("brain_mask.nii.gz")
    assert all(n.inputs.moving_mask == str(nipype_pair["mask"]) for n in regs)
    assert sorted(Path(n.inputs.fixed_image).name for n in regs) == sorted(
        Path(p).name for p in t1w.values())


def test_coregister_wf_is_rigid_and_writes_lta(nipype_pair, tmp_path):
    fixed = nb.load(nipype_pair["fixed"])
    fixed_mask = tmp_path / "fixed_mask.nii.gz"
    nb.save(nb.Nifti1Image((fixed.get_fdata() > 20).astype(np.uint8), fixed.affine),
            fixed_mask)
    wf = init_coregister_wf(extent=192, weights=[str(nipype_pair["weights"])])
    wf.base_dir = str(tmp_path)
    wf.inputs.inputnode.moving_image = str(nipype_pair["moving"])
    wf.inputs.inputnode.fixed_image = str(nipype_pair["fixed"])
    wf.inputs.inputnode.fixed_mask = str(fixed_mask)
    res = node_results(wf.run())
    out = res["coreg"].outputs
    matrix = nt.linear.load(out.forward_transform, fmt="itk").matrix
    assert np.allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-5)
    assert np.isclose(np.linalg.det(matrix[:3, :3]), 1.0, atol=1e-5)
    assert np.allclose(nt.linear.load(out.forward_lta, fmt="fs").matrix, matrix, atol=1e-4)
    masked = nb.load(res["mask_moved"].outputs.out_file).get_fdata()
    assert np.all(masked[nb.load(fixed_mask).get_fdata() == 0] == 0)


# ---------------------------------------------------------------------- execution
@pytest.fixture(scope="module")
def linear_run(nipype_pair, movings, tmp_path_factory) -> Path:
    """Four affine registrations with the Linear plugin: the reference results."""
    base = tmp_path_factory.mktemp("linear")
    four_affine_wf(nipype_pair, movings, base).run()
    return base


def test_multiproc_runs_two_registrations_at_once(nipype_pair, movings, linear_run,
                                                  tmp_path):
    res = four_affine_wf(nipype_pair, movings, tmp_path).run(
        plugin="MultiProc", plugin_args={"n_procs": 2})
    spans = intervals(res, "affine_reg")
    assert len(spans) == 4 and overlapping(spans)
    ref, got = outputs_of(linear_run), outputs_of(tmp_path)
    assert ref.keys() == got.keys() and len(got) == 4
    for key, (params, data) in ref.items():
        assert np.allclose(got[key][0], params, atol=1e-6) and np.allclose(got[key][1], data)


def test_gpu_nodes_on_a_cpu_host(nipype_pair, movings, tmp_path):
    pair = movings[:2]
    with pytest.raises(RuntimeError, match="Insufficient GPU resources"):
        four_affine_wf(nipype_pair, pair, tmp_path / "a", use_gpu=True).run(
            plugin="MultiProc", plugin_args={"n_procs": 2, "n_gpu_procs": 0})
    # one GPU slot: the GPU nodes run one at a time (here on the CPU), though 2 CPUs are free
    res = four_affine_wf(nipype_pair, pair, tmp_path / "b", use_gpu=True).run(
        plugin="MultiProc", plugin_args={"n_procs": 2, "n_gpu_procs": 1})
    spans = intervals(res, "affine_reg")
    assert len(spans) == 2 and not overlapping(spans)
    assert len(outputs_of(tmp_path / "b")) == 2


def test_rerun_reuses_every_cached_result(nipype_pair, movings, linear_run):
    stamps = {p: p.stat().st_mtime_ns for p in linear_run.rglob("*") if p.is_file()}
    # a switch to GPU nodes and more threads changes no hash: nothing runs again
    res = four_affine_wf(nipype_pair, movings, linear_run, use_gpu=True,
                         omp_nthreads=2).run(plugin="MultiProc",
                                             plugin_args={"n_procs": 2, "n_gpu_procs": 2})
    assert len(intervals(res, "affine_reg")) == 4
    after = {p: p.stat().st_mtime_ns for p in stamps}
    changed = [str(p) for p in stamps if after[p] != stamps[p] and "affine_reg" in str(p)]
    assert not changed


KILL_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_workflows import four_affine_wf
from pathlib import Path
args = json.loads(sys.argv[1])
four_affine_wf(args["pair"], args["movings"], Path(args["base"])).run(
    plugin="MultiProc", plugin_args={{"n_procs": 2}})
"""


def test_sigkill_then_rerun_matches_an_uninterrupted_run(nipype_pair, movings, linear_run,
                                                         tmp_path):
    base = tmp_path / "work"
    script = tmp_path / "run_wf.py"
    script.write_text(KILL_SCRIPT.format(tests=str(ROOT / "tests")))
    args = json.dumps({"pair": {k: str(v) for k, v in nipype_pair.items()},
                       "movings": movings, "base": str(base)})
    proc = subprocess.Popen([sys.executable, str(script), args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:  # kill once a first registration has finished and others are under way
        while not list(base.rglob("affine_reg/result_affine_reg.pklz")):
            assert proc.poll() is None, "the workflow ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(base.rglob("affine_reg/result_affine_reg.pklz")))
    assert 1 <= done < 4
    four_affine_wf(nipype_pair, movings, base).run(plugin="MultiProc",
                                                   plugin_args={"n_procs": 2})
    ref, got = outputs_of(linear_run), outputs_of(base)
    assert ref.keys() == got.keys() and len(got) == 4
    for key, (params, data) in ref.items():
        assert np.array_equal(got[key][0], params) and np.array_equal(got[key][1], data)


# --------------------------------------------------------------------------- SLURM
@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node SLURM cluster (started by the project's script), or a skip with
    the reason where it cannot be: not root, or no apt-get to install it."""
    if os.geteuid() != 0:
        pytest.skip("SLURM test needs root to install and start slurmctld/slurmd/munged")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("SLURM test needs apt-get to install slurm-wlm and munge")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_cluster.sh")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_slurm_plugin_runs_four_registrations(slurm_cluster, nipype_pair, movings,
                                              linear_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOGNAME", os.environ.get("LOGNAME") or "root")
    base = tmp_path / "shared_work"  # the work directory every node host must see
    t0 = time.monotonic()
    four_affine_wf(nipype_pair, movings, base).run(
        plugin="SLURM", plugin_args={"sbatch_args": "--cpus-per-task=1 --mem=2G",
                                     "poll_sleep_duration": 1, "max_tries": 2})
    took = time.monotonic() - t0
    ref, got = outputs_of(linear_run), outputs_of(base)
    assert ref.keys() == got.keys() and len(got) == 4
    for key, (params, data) in ref.items():
        assert np.allclose(got[key][0], params, atol=1e-6) and np.allclose(got[key][1], data)
    jobs = list(base.rglob("batch/batchscript_*.sh"))
    assert len(jobs) >= 4  # each registration went through sbatch
    with capsys.disabled():
        print(f"\nSLURM: 4 affine registrations in {took:.1f} s")


def test_splices_into_a_pipeline_in_place_of_smripreps_workflow(nipype_pair, tmp_path):
    """niworkflows' splice_workflow swaps a workflow tagged 'anat.register-template' (here a
    stand-in with sMRIPrep's fields) for ours; the pipeline then runs our registration."""
    from nipype.interfaces import utility as niu
    from niworkflows.engine.splicer import splice_workflow

    standin = pe.Workflow(name="register_template_wf")
    standin._tag = "anat.register-template"
    s_in = pe.Node(niu.IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    s_in.iterables = ("template", ["MNI152NLin2009aSym:res-2"])
    s_pout = pe.Node(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="poutputnode")
    s_out = pe.JoinNode(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode",
                        joinsource="inputnode")
    standin.connect([(s_in, s_pout, [("moving_image", "anat2std_xfm"),
                                     ("moving_image", "std2anat_xfm"),
                                     ("template", "template")]),
                     (s_pout, s_out, [(f, f) for f in OUTPUT_FIELDS])])
    parent = pe.Workflow(name="anat_wf", base_dir=str(tmp_path))
    source = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="source")
    source.inputs.t1w = str(nipype_pair["moving"])
    collect = pe.Node(niu.Function(function=_collect, output_names=["xfms", "templates"]),
                      name="collect")  # a real node: identity nodes leave the run graph
    parent.connect([(source, standin, [("t1w", "inputnode.moving_image")]),
                    (standin, collect, [("outputnode.anat2std_xfm", "xfms"),
                                        ("outputnode.template", "templates")])])
    ours = init_register_template_wf(templates=["MNI152NLin2009aSym:res-2"], mode="affine",
                                     extent=192, weights=[str(nipype_pair["weights"])])
    splice_workflow(parent, {"anat.register-template": ours})
    res = parent.run()
    out = next(n for n in res.nodes() if n.name == "collect").result.outputs
    assert out.templates == ["MNI152NLin2009aSym"]
    assert len(out.xfms) == 1 and out.xfms[0].endswith("fwd_xfm.txt")
    assert np.allclose(nt.linear.load(out.xfms[0], fmt="itk").matrix[3], [0, 0, 0, 1])


def _collect(xfms, templates):
    return xfms, templates
