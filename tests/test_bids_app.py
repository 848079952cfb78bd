"""The BIDS App end to end on the embedded demo dataset (two participants, 2 mm), with
tiny random weights: derivatives found by pybids and by sMRIPrep's precomputed-transform
query, every transform read by nitransforms and SimpleITK, reports, the group level,
reruns, and each refusal with its exit code."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import SimpleITK as sitk
from bids import BIDSLayout
from nitransforms.linear import load as nt_linear_load
from nitransforms.manip import load as nt_chain_load

from synthmorph_nipype.bids_app.cli import main
from synthmorph_nipype.bids_app.demo import make_demo_dataset
from synthmorph_nipype.bids_app.derivatives import DerivativeSink, write_dataset_description
from synthmorph_nipype.bids_app.inputs import EXIT
from synthmorph_nipype.io.atomic import atomic_copy

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore")]  # pybids/nitransforms chatter
TPL = "MNI152NLin2009aSym"
# sMRIPrep's query for precomputed template transforms (its data/io_spec.json, std_xfms)
SMRIPREP_STD_XFMS = {
    "anat2std_xfm": {"datatype": "anat", "extension": "h5", "from": "T1w", "suffix": "xfm",
                     "mode": "image"},
    "std2anat_xfm": {"datatype": "anat", "extension": "h5", "to": "T1w", "suffix": "xfm",
                     "mode": "image"},
}


@pytest.fixture(scope="module")
def demo_bids(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "bids", n_subjects=2)


def common(weights) -> list[str]:
    return ["--weights", str(weights), "--extent", "192", "--nprocs", "2",
            "--omp-nthreads", "1", "--template", f"{TPL}:res-2", "--refine", "2",
            "--refine-affine", "1"]


PASSES = ("--passes", "2")  # the participant run's U-Net runs as a cascade


@pytest.fixture(scope="module")
def participant_run(demo_bids, tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out, work = root / "out", root / "work"
    code = main([str(demo_bids), str(out), "participant", "-w", str(work),
                 *common(tiny_weights["joint"]), *PASSES])
    assert code == 0
    return out, work


def test_derivatives_are_found_as_fmriprep_looks_for_them(participant_run, demo_bids):
    out, _ = participant_run
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"]
    assert desc["DatasetLinks"]["raw"] == demo_bids.resolve().as_uri()
    assert "*_xfm.*" in (out / ".bidsignore").read_text()
    layout = BIDSLayout(str(out), config=["bids", "derivatives"], validate=False)
    for subject in ("01", "02"):
        found = {k: layout.get(return_type="filename", subject=subject, **q,
                               **({"to": TPL} if "from" in q else {"from": TPL}))
                 for k, q in SMRIPREP_STD_XFMS.items()}
        assert all(len(v) == 1 for v in found.values()), found
        preproc = layout.get(return_type="filename", subject=subject, space=TPL, res="2",
                             desc="preproc", suffix="T1w", extension=".nii.gz")
        coreg = layout.get(return_type="filename", subject=subject, suffix="xfm",
                           extension=".txt", to="T1w", mode="image", **{"from": "T2w"})
        assert len(preproc) == 1 and len(coreg) == 1
        fwd, inv = found["anat2std_xfm"][0], found["std2anat_xfm"][0]
        # independent readers: nitransforms and SimpleITK
        assert len(nt_chain_load(fwd, fmt="itk").transforms) == 2
        assert len(nt_chain_load(inv, fmt="itk").transforms) == 2
        comp = sitk.CompositeTransform(sitk.ReadTransform(fwd))
        assert comp.GetNumberOfTransforms() == 2
        rigid = nt_linear_load(coreg[0], fmt="itk").matrix
        assert np.allclose(rigid[:3, :3] @ rigid[:3, :3].T, np.eye(3), atol=1e-5)
        sitk.ReadTransform(coreg[0])
        # the written template-space image is the T1w through the written transform
        t1w = demo_bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz"
        ref = sitk.ReadImage(preproc[0])
        moved = sitk.Resample(sitk.ReadImage(str(t1w), sitk.sitkFloat64), ref,
                              sitk.ReadTransform(fwd), sitk.sitkLinear, 0.0)
        ours = nb.load(preproc[0]).get_fdata()
        theirs = sitk.GetArrayFromImage(moved).transpose(2, 1, 0)
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99
        side = json.loads(Path(fwd.replace(".h5", ".json")).read_text())
        assert side["Mode"] == "joint" and side["Regularization"] == 0.5
        assert side["Refinement"] == {"Steps": 2, "FineSteps": 1, "Similarity": "ncc",
                                      "Lambda": 0.5}
        assert side["NetworkPasses"] == 2
        # the coregistration ran with (and records) the same affine refinement
        affine_steps = {"Steps": 1, "Similarity": "mind"}
        assert side["AffineRefinement"] == affine_steps
        # the template's brain mask restricted the refinements' similarity
        assert side["RefinementMask"]["Fixed"].endswith("desc-brain_mask.nii.gz")
        coreg_side = json.loads(Path(coreg[0].replace(".txt", ".json")).read_text())
        assert coreg_side["Mode"] == "rigid" and coreg_side["AffineRefinement"] == affine_steps
        assert side["Sources"] == [f"bids:raw:sub-{subject}/anat/sub-{subject}_T1w.nii.gz"]
        assert side["Model"] == ["joint.pt"] and len(side["ModelSHA256"][0]) == 16


def test_reports_and_group_summary(participant_run, demo_bids):
    out, _ = participant_run
    for subject in ("01", "02"):
        page = (out / f"sub-{subject}.html").read_text()
        svgs = [line.split('data="')[1].split('"')[0] for line in page.split("<object")[1:]]
        assert len(svgs) == 2  # T1w on the template, T2w on T1w
        for rel in svgs:  # niworkflows' flicker reportlets: two panels of three views
            svg = (out / rel).read_text()
            assert rel.endswith(".svg") and "flickerAnimation" in svg
            assert 'class="background-svg"' in svg and 'class="foreground-svg"' in svg
            assert svg.count("<image") + svg.count("<path") > 6
        summary = json.loads(next((out / f"sub-{subject}").glob("log/*_summary.json"))
                             .read_text())
        assert summary["device"] == "cpu" and summary["registration_s"] > 0
        assert -1 <= summary["similarity"] <= 1 and summary["folding_pct"] >= 0
    assert main([str(demo_bids), str(out), "group"]) == 0
    rows = (out / "group_summary.tsv").read_text().strip().splitlines()
    assert rows[0].split("\t")[:2] == ["participant", "session"] and len(rows) == 3
    page = (out / "group_report.html").read_text()
    assert "group summary" in page
    figure = page.split('<object type="image/svg+xml" data="')[1].split('"')[0]
    svg = (out / figure).read_text()
    for subject in ("01", "02"):  # every point is named, and the thresholds are drawn
        assert f'id="sub-{subject}"' in svg and f"sub-{subject}" in svg.replace(
            f'id="sub-{subject}"', "")
    assert "folding limit" in svg


def test_group_figure_marks_outliers(tmp_path):
    from synthmorph_nipype.bids_app.reports import flag_outliers, group_figure

    rows = [{"participant": f"{k:02d}", "session": "n/a", "similarity": v,
             "folding_pct": f} for k, (v, f) in enumerate(
                 [(0.9, 0.0), (0.91, 0.01), (0.89, 0.0), (0.5, 0.0), (0.9, 2.0)])]
    threshold = flag_outliers(rows)
    assert [r["outlier"] for r in rows] == ["no", "no", "no", "yes", "yes"]
    svg = Path(group_figure(rows, threshold, tmp_path / "g.svg")).read_text()
    assert all(f'id="sub-{r["participant"]}"' in svg for r in rows)
    assert f"similarity limit {threshold:.3f}" in svg


def test_rerun_reuses_the_work_directory(participant_run, demo_bids, tiny_weights, tmp_path):
    out, work = participant_run
    registered = [p for p in work.rglob("*_reg/*_xfm.*")]
    stamps = {p: p.stat().st_mtime_ns for p in registered}
    derivatives = {p: p.read_bytes() for p in out.rglob("*_xfm.*")}
    removed = next(p for p in derivatives if p.name.endswith(".h5"))
    removed.unlink()  # a rerun with the same work directory restores it, registering nothing
    plugin = tmp_path / "plugin.yml"  # --use-plugin, here the Linear plugin
    plugin.write_text("plugin: Linear\nplugin_args: {}\n")
    assert main([str(demo_bids), str(out), "participant", "-w", str(work),
                 "--use-plugin", str(plugin), *common(tiny_weights["joint"]), *PASSES]) == 0
    assert registered and {p: p.stat().st_mtime_ns for p in registered} == stamps
    assert {p: p.read_bytes() for p in derivatives} == derivatives
    for text, kind in (("plugin_args: {n_procs: 2}\n", "bad_filter"),
                       ("plugin: NoSuchPlugin\n", "bad_filter")):
        plugin.write_text(text)
        code = main([str(demo_bids), str(out), "participant", "-w", str(work),
                     "--use-plugin", str(plugin), *common(tiny_weights["joint"]), *PASSES])
        assert code == EXIT[kind]


def _code(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_refusals_have_their_own_exit_codes(demo_bids, tiny_weights, tmp_path, capsys):
    w = common(tiny_weights["joint"])
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    bad_filter = tmp_path / "filter.json"
    bad_filter.write_text(json.dumps({"t1w": {"nonsense_entity": "x"}}))
    cases = [
        ([empty, out, "participant", *w], "not_bids", "not a BIDS dataset"),
        ([demo_bids, out, "participant", "--participant-label", "sub-07", *w],
         "missing_participant", "sub-07"),
        ([demo_bids, out, "participant", "--session-label", "nope", *w], "no_participants",
         "no participants match"),
        ([demo_bids, demo_bids / "out", "participant", *w], "output_inside_input",
         "inside the input dataset"),
        ([demo_bids, a_file / "out", "participant", *w], "unwritable_output",
         "not writable"),
        ([demo_bids, out, "participant", "--bids-filter-file", demo_bids / "README", *w],
         "bad_filter", "filter file"),
        ([demo_bids, out, "participant", "--bids-filter-file", bad_filter, *w], "bad_filter",
         "bids filter for T1w"),
        ([demo_bids, out, "participant", *w, "--template", "NoSuchTemplate"], "bad_template",
         "not available offline"),
        ([demo_bids, out, "participant", "--weights", tmp_path / "none.pt"], "no_weights",
         "none.pt"),
    ]
    for argv, kind, text in cases:
        code, line = _code(argv, capsys)
        assert code == EXIT[kind], (kind, line)
        assert line.startswith("synthmorph-bids: error:") and text in line, line
        assert not out.exists() and not (demo_bids / "out").exists()


def test_subject_without_anatomy_is_skipped_or_refused(demo_bids, tiny_weights, tmp_path,
                                                      capsys):
    bids = tmp_path / "bids"
    shutil.copytree(demo_bids, bids)
    func = bids / "sub-03" / "func"
    func.mkdir(parents=True)
    shutil.copy(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz",
                func / "sub-03_task-rest_bold.nii.gz")
    code, line = _code([bids, tmp_path / "out", "participant", "--participant-label", "03",
                        "--skip-bids-validation", *common(tiny_weights["joint"])], capsys)
    assert code == EXIT["no_anatomy"] and "sub-03" in line
    from synthmorph_nipype.bids_app.inputs import index_dataset, select_units

    units = select_units(index_dataset(bids, validate=False))
    assert [u.subject for u in units] == ["01", "02"]  # sub-03 skipped with a warning


def test_unreadable_file_skips_its_subject_and_the_others_run(demo_bids, tiny_weights,
                                                             tmp_path, capsys, caplog):
    """A DataLad-style broken symlink (sub-02's T2w, never fetched) and a corrupt T1w of a
    third subject: both are skipped with a warning naming the file, sub-01 is processed,
    and the exit code says that some units were skipped. Several T1w runs: the first is
    used, and the warning lists them."""
    bids = tmp_path / "bids"
    shutil.copytree(demo_bids, bids)
    t2w = bids / "sub-02" / "anat" / "sub-02_T2w.nii.gz"
    t2w.unlink()
    t2w.symlink_to("../../.git/annex/objects/XX/never-fetched.nii.gz")
    (bids / "sub-03" / "anat").mkdir(parents=True)
    (bids / "sub-03" / "anat" / "sub-03_T1w.nii.gz").write_bytes(b"\x1f\x8b garbage")
    anat = bids / "sub-01" / "anat"
    shutil.copy(anat / "sub-01_T1w.nii.gz", anat / "sub-01_run-2_T1w.nii.gz")
    shutil.move(anat / "sub-01_T1w.nii.gz", anat / "sub-01_run-1_T1w.nii.gz")
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--skip-bids-validation",
                 "-w", str(tmp_path / "work"), *common(tiny_weights["joint"])])
    err = capsys.readouterr().err + caplog.text  # the log reaches one or the other
    assert code == EXIT["some_skipped"]
    assert "sub-02: skipped" in err and "sub-02_T2w.nii.gz: broken symlink" in err
    assert "sub-03: skipped" in err and "sub-03_T1w.nii.gz: not readable" in err
    assert ("2 T1w images (sub-01_run-1_T1w.nii.gz, sub-01_run-2_T1w.nii.gz); using the "
            "first, sub-01_run-1_T1w.nii.gz") in err
    assert "Traceback" not in err
    xfms = sorted(p.name for p in out.rglob("*_xfm.h5"))
    assert xfms and all(name.startswith("sub-01_") for name in xfms)
    assert not (out / "sub-02").exists() and not (out / "sub-03").exists()
    # only unreadable subjects left: refused up front, nothing written
    code, line = _code([bids, tmp_path / "out2", "participant", "--participant-label", "02",
                        "--skip-bids-validation", *common(tiny_weights["joint"])], capsys)
    assert code == EXIT["no_anatomy"] and "sub-02" in line
    assert not (tmp_path / "out2").exists()


def test_dataset_description_written_once_under_concurrency(tmp_path):
    def write():
        write_dataset_description(tmp_path)

    threads = [threading.Thread(target=write) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads((tmp_path / "dataset_description.json").read_text())["DatasetType"] \
        == "derivative"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bidsignore",
                                                          "dataset_description.json"]


def test_interrupted_copy_leaves_no_derivative(tmp_path, monkeypatch):
    src = tmp_path / "src.nii.gz"
    src.write_bytes(b"x" * 10_000)
    dst = tmp_path / "out" / "sub-01_T1w.nii.gz"

    def broken(a, b, **kw):
        Path(b).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", broken)
    with pytest.raises(OSError):
        atomic_copy(src, dst)
    assert list(dst.parent.iterdir()) == []
    monkeypatch.undo()
    res = DerivativeSink(in_file=str(src), output_dir=str(tmp_path / "ds"),
                         entities={"subject": "01", "desc": "preproc", "suffix": "T1w"}).run()
    assert Path(res.outputs.out_file).name == "sub-01_desc-preproc_T1w.nii.gz"
    assert Path(res.outputs.out_file).read_bytes() == src.read_bytes()


def test_demo_runs_both_levels(tiny_weights, tmp_path, capsys):
    code = main(["--demo", str(tmp_path / "demo"), "--weights", str(tiny_weights["joint"]),
                 "--extent", "192", "--nprocs", "2", "--mode", "affine"])
    assert code == 0
    out = tmp_path / "demo" / "derivatives"
    assert "group_report.html" in capsys.readouterr().out
    rows = (out / "group_summary.tsv").read_text().strip().splitlines()[1:]
    assert len(rows) == 3 and all("\taffine\t" in r for r in rows)
    raw = BIDSLayout(str(tmp_path / "demo" / "bids"))  # the demo dataset is valid BIDS
    assert raw.get_subjects() == ["01", "02", "03"]
    assert len(raw.get(suffix="T2w", extension=".nii.gz")) == 3


def _validator_errors(root: Path) -> list[str]:
    """The errors the official BIDS validator (bids-validator-deno) finds in ``root``."""
    import subprocess

    exe = shutil.which("bids-validator-deno")
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install .[test])")
    run = subprocess.run([exe, "--format", "json", str(root)], capture_output=True,
                         text=True, timeout=600)
    report = json.loads(run.stdout)
    issues = report["issues"]["issues"]
    return sorted({f"{i['code']}: {i.get('location', '')}" for i in issues
                   if i.get("severity") == "error"})


def test_official_validator_finds_no_errors(participant_run, demo_bids):
    """The raw demo dataset and the derivatives of both levels (transforms, resampled
    images, reports, figures, logs, group summary) pass bids-validator-deno."""
    out, _ = participant_run
    assert main([str(demo_bids), str(out), "group"]) == 0
    assert (out / "group_summary.tsv").is_file()
    assert _validator_errors(demo_bids) == []
    assert _validator_errors(out) == []
