"""Nipype interfaces: the real ``synthmorph`` program runs in each node (tiny weights),
and its transforms are read back by SimpleITK and nitransforms, not by our code."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import nitransforms as nt
import numpy as np
import pytest
import SimpleITK as sitk
from nipype.pipeline import engine as pe

from synthmorph_nipype.interfaces import (
    ApplyMask,
    SynthMorphApply,
    SynthMorphRegister,
    TemplateSource,
    estimate_mem_gb,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:Reference space not set")]  # nitransforms


def sitk_resample(moving: Path, reference: Path, xfm: Path, nearest: bool = False):
    """``moving`` on ``reference``'s grid through the ITK transform file ``xfm``, by
    SimpleITK alone; returned in nibabel's (i, j, k) order."""
    out = sitk.Resample(sitk.ReadImage(str(moving), sitk.sitkFloat64),
                        sitk.ReadImage(str(reference)), sitk.ReadTransform(str(xfm)),
                        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def run_node(interface, base: Path, name: str):
    node = pe.Node(interface, name=name, base_dir=str(base))
    return node.run().outputs


@pytest.fixture(scope="module")
def affine_outputs(nipype_pair, tmp_path_factory):
    reg = SynthMorphRegister(moving_image=str(nipype_pair["moving"]),
                             fixed_image=str(nipype_pair["fixed"]), mode="affine", extent=192,
                             weights=[str(nipype_pair["weights"])], write_inverse_moved=True)
    return run_node(reg, tmp_path_factory.mktemp("iface"), "affine_reg")


def test_register_affine_outputs_read_by_itk_and_nitransforms(affine_outputs, nipype_pair):
    out = affine_outputs
    for name in ("forward_transform", "inverse_transform", "forward_lta", "inverse_lta",
                 "moved_image", "inverse_moved_image"):
        assert Path(getattr(out, name)).is_file(), name
    assert out.forward_transform.endswith(".txt") and out.forward_lta.endswith(".lta")
    assert out.device == "cpu" and 0 < out.elapsed_s < 120  # parsed from the program
    # SimpleITK resampling through the ITK file = the image our node wrote
    moved = nb.load(out.moved_image).get_fdata()
    assert corr(sitk_resample(nipype_pair["moving"], nipype_pair["fixed"],
                              out.forward_transform), moved) > 0.999
    back = nb.load(out.inverse_moved_image).get_fdata()
    assert corr(sitk_resample(nipype_pair["fixed"], nipype_pair["moving"],
                              out.inverse_transform), back) > 0.999
    # nitransforms: the LTA and the ITK file hold the same map, and -T inverts -t
    lta = nt.linear.load(out.forward_lta, fmt="fs").matrix
    itk = nt.linear.load(out.forward_transform, fmt="itk").matrix
    inv = nt.linear.load(out.inverse_transform, fmt="itk").matrix
    assert np.allclose(lta, itk, atol=1e-4)
    assert np.allclose(itk @ inv, np.eye(4), atol=1e-4)


def test_apply_interface_matches_register_and_keeps_labels(affine_outputs, nipype_pair,
                                                           tmp_path):
    app = SynthMorphApply(transform=affine_outputs.forward_transform,
                          input_image=str(nipype_pair["moving"]),
                          reference_image=str(nipype_pair["fixed"]))
    out = run_node(app, tmp_path, "apply")
    assert np.allclose(nb.load(out.output_image).get_fdata(),
                       nb.load(affine_outputs.moved_image).get_fdata(), atol=1e-4)
    lab = SynthMorphApply(transform=affine_outputs.forward_transform,
                          input_image=str(nipype_pair["labels"]),
                          reference_image=str(nipype_pair["fixed"]),
                          interpolation="nearest", dtype="uint8")
    res = nb.load(run_node(lab, tmp_path, "apply_labels").output_image)
    data = np.asarray(res.dataobj)
    assert res.get_data_dtype() == np.uint8 and set(np.unique(data)) <= {0, 1, 2}
    ref = sitk_resample(nipype_pair["labels"], nipype_pair["fixed"],
                        affine_outputs.forward_transform, nearest=True)
    assert np.mean(data == ref) > 0.995


def test_deform_from_initial_affine_is_one_itk_composite(affine_outputs, nipype_pair,
                                                         tmp_path):
    reg = SynthMorphRegister(moving_image=str(nipype_pair["moving"]),
                             fixed_image=str(nipype_pair["fixed"]), mode="deform", extent=192,
                             init_transform=affine_outputs.forward_transform,
                             weights=[str(nipype_pair["weights"])])
    out = run_node(reg, tmp_path, "deform_reg")
    assert out.forward_transform.endswith(".h5") and out.inverse_transform.endswith(".h5")
    comp = sitk.CompositeTransform(sitk.ReadTransform(out.forward_transform))
    assert comp.GetNumberOfTransforms() == 2
    first = comp.GetNthTransform(0)
    init = sitk.ReadTransform(affine_outputs.forward_transform)
    assert np.allclose(first.GetParameters(), init.GetParameters(), atol=1e-5)
    assert comp.GetNthTransform(1).GetName() == "DisplacementFieldTransform"
    moved = nb.load(out.moved_image).get_fdata()
    assert corr(sitk_resample(nipype_pair["moving"], nipype_pair["fixed"],
                              out.forward_transform), moved) > 0.99


def test_gpu_and_threads_do_not_change_the_hash(nipype_pair):
    def reg(**kw):
        return SynthMorphRegister(moving_image=str(nipype_pair["moving"]),
                                  fixed_image=str(nipype_pair["fixed"]), **kw)

    base = reg().inputs.get_hashval()[1]
    assert reg(use_gpu=True, num_threads=8).inputs.get_hashval()[1] == base
    assert reg(regularization=0.3).inputs.get_hashval()[1] != base
    assert "--cpu" in reg().cmdline.split() and "--cpu" not in reg(use_gpu=True).cmdline
    assert "-j 8" in reg(num_threads=8).cmdline
    node = pe.Node(reg(), name="n", n_procs=3)
    assert node.inputs.num_threads == 3
    assert pe.Node(reg(use_gpu=True), name="g").is_gpu_node()


def test_bad_input_fails_the_node_with_the_one_line_error(nipype_pair, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    reg = SynthMorphRegister(moving_image=str(bad), fixed_image=str(nipype_pair["fixed"]),
                             mode="affine", weights=[str(nipype_pair["weights"])])
    with pytest.raises(RuntimeError, match=r"synthmorph register: error: .*broken\.nii\.gz"):
        run_node(reg, tmp_path, "bad")
    assert not list((tmp_path / "bad").glob("*_xfm.*"))


def test_mask_and_template_helpers(nipype_pair, tmp_path):
    out = run_node(ApplyMask(in_file=str(nipype_pair["moving"]),
                             in_mask=str(nipype_pair["mask"])), tmp_path, "mask")
    data, mask = (nb.load(p).get_fdata() for p in (out.out_file, nipype_pair["mask"]))
    assert np.all(data[mask == 0] == 0) and np.all(data[mask > 0] > 0)
    same = run_node(ApplyMask(in_file=str(nipype_pair["moving"])), tmp_path, "nomask")
    assert same.out_file == str(nipype_pair["moving"])
    with pytest.raises(Exception, match="mask grid differs"):  # nipype wraps the error
        run_node(ApplyMask(in_file=str(nipype_pair["fixed"]),
                           in_mask=str(nipype_pair["mask"])), tmp_path, "wronggrid")
    tpl = run_node(TemplateSource(template="MNI152NLin2009aSym:res-2"), tmp_path, "tpl")
    assert tpl.name == "MNI152NLin2009aSym" and tpl.spec == {"res": "2"}
    img = nb.load(tpl.t1w_file)
    assert img.shape == (99, 117, 95) and np.allclose(img.affine[:3, 3], [-98, -134, -72])
    assert nb.load(tpl.brain_mask).shape == img.shape


def test_memory_estimates_grow_with_model_and_extent():
    assert estimate_mem_gb("affine", 256) < estimate_mem_gb("joint", 256)
    assert estimate_mem_gb("joint", 192) < estimate_mem_gb("joint", 256)
    assert estimate_mem_gb("joint", 256) < estimate_mem_gb("joint", 256, official=True)
    with pytest.raises(ValueError, match="extent"):
        estimate_mem_gb("joint", 128)
