"""Models: Keras weight loading, checkpoints, affine-head geometry, sampling, integration.

Every Keras file here is written by :func:`write_keras_h5` from random arrays, in the
layout Keras ``save_weights`` uses; nothing is read from outside the project.
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage

from synthmorph_nipype.errors import WeightsError
from synthmorph_nipype.models import AffineConfig, AffineDetector, HyperUNet, UNet, UNetConfig
from synthmorph_nipype.models.affine import (
    barycenters,
    fit_affine,
    rigid_part,
    symmetric_affine,
)
from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint
from synthmorph_nipype.models.keras import load_keras

from .helpers import TINY_AFFINE, TINY_UNET, apply, random_affine, tiny_models

# --------------------------------------------------------------------------------------
# A writer of Keras ``save_weights`` files and random weights of the two networks
# --------------------------------------------------------------------------------------


def write_keras_h5(path, groups) -> None:
    """Write a Keras-layout weights file.

    ``groups`` is a list of ``(group_name, [(weight_name, array), ...])`` in load order;
    an empty list makes a weightless layer. Root attribute ``layer_names`` lists the
    groups in the given order, each group's ``weight_names`` its arrays in the given
    order, and every array is stored at ``group[weight_name]``.
    """
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([g.encode() for g, _ in groups])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.11.0"
        for group_name, weights in groups:
            group = f.create_group(group_name)
            group.attrs["weight_names"] = np.array([w.encode() for w, _ in weights],
                                                   dtype="S" if weights else "S1")
            for weight_name, array in weights:
                group.create_dataset(weight_name, data=array)


def conv_names(n: int, start: int) -> list[str]:
    """Layer names with global counters that cross 9 -> 10, so that alphabetical order
    (``conv3d_10`` < ``conv3d_8``) differs from the load order."""
    return [f"conv3d_{start + i}" for i in range(n)]


def affine_arrays(rng, num_chan, enc_nf, add_nf, num_feat):
    """Random ``(kernel (3, 3, 3, cin, cout), bias)`` per detector convolution."""
    out, cin = [], num_chan
    for cout in (*enc_nf, *add_nf, num_feat):
        kernel = rng.normal(0, 0.3, (3, 3, 3, cin, cout)).astype(np.float32)
        out.append((kernel, rng.normal(0, 0.1, cout).astype(np.float32)))
        cin = cout
    return out


def deform_arrays(rng, hyp_units, chans):
    """Random hypernetwork arrays: dense ``(kernel, bias)`` and per hyper-convolution
    ``(hyperkernel_kernel, hyperkernel_bias, hyperbias_kernel, hyperbias_bias)``."""
    dense, prev = [], 1
    for n in hyp_units:
        dense.append((rng.normal(0, 0.8, (prev, n)).astype(np.float32),
                      rng.normal(0.2, 0.3, n).astype(np.float32)))
        prev = n
    hyper = []
    for cin, cout in chans:
        size = 27 * cin * cout
        hyper.append((rng.normal(0, 0.1, (prev, size)).astype(np.float32),
                      rng.normal(0, 0.1, size).astype(np.float32),
                      rng.normal(0, 0.1, (prev, cout)).astype(np.float32),
                      rng.normal(0, 0.1, cout).astype(np.float32)))
    return dense, hyper


def affine_weights(arrays, names):
    return [(f"{name}/{a}:0", x) for name, pair in zip(names, arrays, strict=True)
            for a, x in zip(("kernel", "bias"), pair, strict=True)]


HYPER_ARRAYS = ("hyperkernel_kernel", "hyperkernel_bias", "hyperbias_kernel", "hyperbias_bias")


def deform_weights(dense, hyper, dense_names, hyper_names):
    out = [(f"{name}/{a}:0", x) for name, pair in zip(dense_names[:len(dense)], dense,
                                                      strict=True)
           for a, x in zip(("kernel", "bias"), pair, strict=True)]
    out += [(f"{name}/{a}:0", x) for name, arrays in zip(hyper_names, hyper, strict=True)
            for a, x in zip(HYPER_ARRAYS, arrays, strict=True)]
    return out


DET = AffineConfig(num_feat=4, enc_nf=(3, 4, 5, 6), add_nf=(5, 4), num_chan=2)
DEF = UNetConfig(hyp_units=(3, 5), enc_nf=(3, 4, 5, 6), dec_nf=(6, 5, 4, 3),
                 add_nf=(4, 3, 3, 2))  # 13 hyper-convolutions, as the official model
DET_NAMES = conv_names(7, start=5)  # conv3d_5 ... conv3d_11


def hyper_names(n: int) -> list[str]:
    return ["hyper_conv_from_dense"] + [f"hyper_conv_from_dense_{i}" for i in range(1, n)]


HYPER_NAMES = hyper_names(13)  # _10, _11, _12 sort before _2
DENSE_NAMES = ["dense", "dense_1", "dense_2", "dense_3"]


def det_arrays(seed=0, config=DET):
    rng = np.random.default_rng(seed)
    return affine_arrays(rng, config.num_chan, config.enc_nf, config.add_nf, config.num_feat)


def def_arrays(seed=1, config=DEF):
    return deform_arrays(np.random.default_rng(seed), config.hyp_units, config.layer_channels())


def write_affine_file(path, arrays, names=DET_NAMES):
    """Flat layout: one group per layer, between weightless input/lambda layers."""
    groups = [("input_1", []), ("input_2", [])]
    groups += [(name, affine_weights([pair], [name])) for name, pair in zip(names, arrays,
                                                                            strict=True)]
    groups.append(("lambda_3", []))
    write_keras_h5(path, groups)


def write_deform_file(path, dense, hyper):
    """Nested layout: all arrays of the deformable model in one group."""
    names = hyper_names(len(hyper))
    write_keras_h5(path, [("input_1", []), ("input_2", []),
                          ("hyper_vxm_dense", deform_weights(dense, hyper, DENSE_NAMES, names)),
                          ("lambda", [])])


def write_joint_file(path, det, dense, hyper):
    """Detector group first, then the deformable group, with weightless layers around."""
    write_keras_h5(path, [("input_1", []), ("input_2", []), ("hyp_input", []),
                          ("model_1", affine_weights(det, DET_NAMES)),
                          ("spatial_transformer", []),
                          ("hyper_vxm_dense", deform_weights(dense, hyper, DENSE_NAMES,
                                                             HYPER_NAMES))])


def keras_kernel(kernel) -> np.ndarray:
    """Keras ``(kx, ky, kz, cin, cout)`` -> torch ``(cout, cin, kx, ky, kz)``."""
    return np.transpose(kernel, (4, 3, 0, 1, 2))


def hyper_features(dense, lam) -> np.ndarray:
    h = np.array([[lam]], dtype=np.float64)
    for kernel, bias in dense:
        h = np.maximum(h @ kernel.astype(np.float64) + bias, 0)
    return h


def check_affine_weights(model: AffineDetector, arrays) -> None:
    convs = [*model.enc, *model.add, model.out]
    assert len(convs) == len(arrays)
    for conv, (kernel, bias) in zip(convs, arrays, strict=True):
        np.testing.assert_array_equal(conv.weight.detach().numpy(), keras_kernel(kernel))
        np.testing.assert_array_equal(conv.bias.detach().numpy(), bias)


def check_hyper_weights(model: HyperUNet, dense, hyper) -> None:
    for linear, (kernel, bias) in zip(model.hyper, dense, strict=True):
        np.testing.assert_array_equal(linear.weight.detach().numpy(), kernel.T)
        np.testing.assert_array_equal(linear.bias.detach().numpy(), bias)
    for conv, (kk, kb, bk, bb) in zip(model.convs, hyper, strict=True):
        np.testing.assert_array_equal(conv.hyperkernel.weight.detach().numpy(), kk.T)
        np.testing.assert_array_equal(conv.hyperkernel.bias.detach().numpy(), kb)
        np.testing.assert_array_equal(conv.hyperbias.weight.detach().numpy(), bk.T)
        np.testing.assert_array_equal(conv.hyperbias.bias.detach().numpy(), bb)


# --------------------------------------------------------------------------------------
# 1. Loading Keras files
# --------------------------------------------------------------------------------------


def test_writer_order_differs_from_alphabetical(tmp_path):
    """The test files really exercise load order: h5py's own order is alphabetical."""
    path = tmp_path / "a.h5"
    write_affine_file(path, det_arrays())
    with h5py.File(path, "r") as f:
        listed = [n.decode() for n in f.attrs["layer_names"]]
        assert listed != sorted(listed)
        assert list(f.keys()) == sorted(listed)
        assert listed.index("conv3d_9") < listed.index("conv3d_10")
        assert list(f["conv3d_9"].attrs["weight_names"]) == [b"conv3d_9/kernel:0",
                                                             b"conv3d_9/bias:0"]
        assert len(f["input_1"].attrs["weight_names"]) == 0


def test_load_affine_detector(tmp_path):
    path = tmp_path / "affine.h5"
    arrays = det_arrays()
    write_affine_file(path, arrays)
    models = load_keras(path)
    assert models.deform is None
    model = models.affine
    assert isinstance(model, AffineDetector) and not model.training
    cfg = model.config
    assert (cfg.num_chan, cfg.enc_nf, cfg.dec_nf, cfg.add_nf, cfg.num_feat) == (
        2, (3, 4, 5, 6), (), (5, 4), 4)
    assert cfg.rigid is False
    assert load_keras(path, rigid=True).affine.config.rigid is True
    check_affine_weights(model, arrays)

    # The first convolution against an independent computation (correlation, zero padding).
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 12, 10, 11)).astype(np.float32)
    with torch.no_grad():
        got = model.enc[0](torch.from_numpy(x)[None])[0].numpy()
    kernel, bias = arrays[0]
    want = np.stack([
        sum(ndimage.correlate(x[ci].astype(np.float64), kernel[..., ci, co].astype(np.float64),
                              mode="constant", cval=0.0) for ci in range(2)) + bias[co]
        for co in range(kernel.shape[-1])])
    assert got.shape == want.shape == (3, 12, 10, 11)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    # The whole detector runs on what was loaded.
    with torch.no_grad():
        feat = model.features(torch.from_numpy(rng.normal(size=(1, 2, 16, 16, 16)))
                              .float())
    assert feat.shape == (1, 4, 1, 1, 1)


def test_load_deformable(tmp_path):
    path = tmp_path / "deform.h5"
    dense, hyper = def_arrays()
    write_deform_file(path, dense, hyper)
    models = load_keras(path)
    assert models.affine is None
    hyper_model = models.deform
    assert isinstance(hyper_model, HyperUNet)
    assert hyper_model.config == DEF
    check_hyper_weights(hyper_model, dense, hyper)

    unet = load_keras(path, lam=0.3).deform
    assert isinstance(unet, UNet) and not isinstance(unet, HyperUNet)
    assert unet.config == DEF

    # One specialised kernel against the numpy formula.
    h = hyper_features(dense, 0.3)
    assert np.all(h >= 0) and np.any(h > 0)
    chans = DEF.layer_channels()
    for i in (0, 5, 12):
        cin, cout = chans[i]
        kk, kb, bk, bb = (a.astype(np.float64) for a in hyper[i])
        kernel = (h @ kk + kb).reshape(3, 3, 3, cin, cout)
        np.testing.assert_allclose(unet.convs[i].weight.detach().numpy(), keras_kernel(kernel),
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(unet.convs[i].bias.detach().numpy(), (h @ bk + bb)[0],
                                   atol=1e-5, rtol=1e-5)

    # The specialised U-Net and the hypernetwork agree at lambda = 0.3 ...
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 2, 16, 16, 16))).float()
    with torch.no_grad():
        a = unet(x)
        b = hyper_model(x, 0.3)
        c = hyper_model(x, 0.9)
        d = hyper_model.specialize(0.3)(x)
    assert a.shape == (1, 3, 16, 16, 16)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(d, b, atol=1e-5, rtol=1e-4)
    # ... but lambda does change the result.
    assert (c - b).abs().max() > 1e-3


def test_load_joint(tmp_path):
    path = tmp_path / "joint.h5"
    det = det_arrays(seed=3, config=dataclasses.replace(DET, num_chan=1))
    dense, hyper = def_arrays(seed=4)
    write_joint_file(path, det, dense, hyper)

    models = load_keras(path)
    assert models.affine.config.num_chan == 1
    assert models.affine.config.add_nf == (5, 4)
    check_affine_weights(models.affine, det)
    assert models.deform.config == DEF
    check_hyper_weights(models.deform, dense, hyper)

    only_det = load_keras(path, want_deform=False)
    assert only_det.deform is None and only_det.affine is not None
    only_def = load_keras(path, want_affine=False, lam=0.5)
    assert only_def.affine is None and isinstance(only_def.deform, UNet)
    x = torch.from_numpy(np.random.default_rng(6).normal(size=(1, 2, 16, 16, 16))).float()
    with torch.no_grad():
        torch.testing.assert_close(only_def.deform(x), models.deform(x, 0.5),
                                   atol=1e-5, rtol=1e-4)


def test_load_unequal_widths(tmp_path):
    """Widths are inferred, not assumed: a decoder of unequal widths loads with its skips."""
    config = UNetConfig(hyp_units=(2,), enc_nf=(2, 3, 4, 5), dec_nf=(5, 4, 3, 2),
                        add_nf=(3,), num_chan=1)
    dense, hyper = def_arrays(seed=7, config=config)
    path = tmp_path / "d.h5"
    write_deform_file(path, dense, hyper)
    model = load_keras(path).deform
    assert model.config == config
    got = [(c.cin, c.cout) for c in model.convs]
    assert got == [(2, 2), (2, 3), (3, 4), (4, 5), (5, 5), (5 + 5, 4), (4 + 4, 3),
                   (3 + 3, 2), (2 + 2, 3), (3, 3)]


# --------------------------------------------------------------------------------------
# 2. Files that do not fit
# --------------------------------------------------------------------------------------


def test_affine_channel_mismatch_names_layer(tmp_path):
    arrays = det_arrays()
    kernel, bias = arrays[5]  # second additional conv: cin should be 5
    arrays[5] = (np.zeros((3, 3, 3, 7, kernel.shape[-1]), np.float32), bias)
    arrays[6] = (np.zeros((3, 3, 3, 7, 4), np.float32), arrays[6][1])  # and follows it
    path = tmp_path / "bad.h5"
    write_affine_file(path, arrays)
    with pytest.raises(WeightsError) as err:
        load_keras(path)
    msg = str(err.value)
    assert str(path) in msg
    assert f"'{DET_NAMES[5]}'" in msg
    assert not any(f"'{n}'" in msg for n in DET_NAMES[:5] + DET_NAMES[6:])


def test_affine_kernel_size_mismatch(tmp_path):
    arrays = det_arrays()
    arrays[2] = (np.zeros((5, 5, 5, 4, 5), np.float32), arrays[2][1])
    path = tmp_path / "bad.h5"
    write_affine_file(path, arrays)
    with pytest.raises(WeightsError, match=f"'{DET_NAMES[2]}'"):
        load_keras(path)


def test_deform_four_outputs_names_final_layer(tmp_path):
    config = dataclasses.replace(DEF)
    chans = config.layer_channels()
    chans[-1] = (chans[-1][0], 4)
    dense, hyper = deform_arrays(np.random.default_rng(0), config.hyp_units, chans)
    path = tmp_path / "bad.h5"
    write_deform_file(path, dense, hyper)
    with pytest.raises(WeightsError) as err:
        load_keras(path)
    msg = str(err.value)
    assert f"'{HYPER_NAMES[-1]}'" in msg and str(path) in msg
    with pytest.raises(WeightsError, match=f"'{HYPER_NAMES[-1]}'"):
        load_keras(path, lam=0.3)


def test_deform_hyper_size_not_multiple(tmp_path):
    dense, hyper = def_arrays()
    kk, kb, bk, bb = hyper[6]
    cout = bb.shape[0]
    hyper[6] = (np.zeros((kk.shape[0], kk.shape[1] + 27), np.float32),
                np.zeros(kb.shape[0] + 27, np.float32), bk, bb)
    assert (kk.shape[1] + 27) % (27 * cout)
    path = tmp_path / "bad.h5"
    write_deform_file(path, dense, hyper)
    with pytest.raises(WeightsError) as err:
        load_keras(path)
    msg = str(err.value)
    assert f"'{HYPER_NAMES[6]}'" in msg
    assert not any(f"'{n}'" in msg for n in HYPER_NAMES[:6] + HYPER_NAMES[7:])


def test_deform_channel_chain_mismatch(tmp_path):
    """A decoder layer that ignores the skip connection does not fit."""
    chans = DEF.layer_channels()
    chans[5] = (chans[4][1], chans[5][1])  # cin without the skip channels
    dense, hyper = deform_arrays(np.random.default_rng(0), DEF.hyp_units, chans)
    path = tmp_path / "bad.h5"
    write_deform_file(path, dense, hyper)
    with pytest.raises(WeightsError, match=f"'{HYPER_NAMES[5]}'"):
        load_keras(path)


def test_dense_mismatch(tmp_path):
    dense, hyper = def_arrays()
    dense[1] = (np.zeros((4, 5), np.float32), dense[1][1])  # takes 4, the first gives 3
    path = tmp_path / "bad.h5"
    write_deform_file(path, dense, hyper)
    with pytest.raises(WeightsError, match="'dense_1'"):
        load_keras(path)


def test_not_hdf5(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("this is not an HDF5 file\n")
    with pytest.raises(WeightsError) as err:
        load_keras(path)
    assert str(path) in str(err.value)
    missing = tmp_path / "missing.h5"
    with pytest.raises(WeightsError) as err:
        load_keras(missing)
    assert str(missing) in str(err.value)


def test_hdf5_without_layer_names(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("conv3d/kernel:0", data=np.zeros((3, 3, 3, 1, 2), np.float32))
    with pytest.raises(WeightsError) as err:
        load_keras(path)
    assert str(path) in str(err.value)


def test_keras_file_without_models(tmp_path):
    path = tmp_path / "empty.h5"
    write_keras_h5(path, [("input_1", []), ("lambda", [])])
    with pytest.raises(WeightsError, match="empty.h5"):
        load_keras(path)


# --------------------------------------------------------------------------------------
# 3. Checkpoints
# --------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    affine, deform = tiny_models(seed=3)
    path = tmp_path / "joint.pt"
    save_checkpoint(path, affine=affine, deform=deform, meta={"source": "test", "lam": 0.5})

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "synthmorph-nipype"

    loaded = load_checkpoint(path)
    assert loaded["meta"] == {"source": "test", "lam": 0.5}
    assert loaded["affine"].config == affine.config == TINY_AFFINE
    assert loaded["deform"].config == deform.config == TINY_UNET
    assert isinstance(loaded["deform"], HyperUNet)
    for a, b in ((affine, loaded["affine"]), (deform, loaded["deform"])):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(1, 2, 16, 16, 16))).float()
    img = torch.from_numpy(rng.normal(size=(1, 1, 32, 32, 32))).float()
    with torch.no_grad():
        assert torch.equal(deform(x, 0.5), loaded["deform"](x, 0.5))
        feat = affine.features(img)
        assert feat.shape == (1, 6, 2, 2, 2) and feat.abs().max() > 0
        assert torch.equal(feat, loaded["affine"].features(img))

    # A specialised U-Net and a detector alone.
    unet = deform.specialize(0.5)
    path2 = tmp_path / "unet.pt"
    save_checkpoint(path2, deform=unet)
    loaded2 = load_checkpoint(path2)
    assert loaded2["affine"] is None and isinstance(loaded2["deform"], UNet)
    with torch.no_grad():
        assert torch.equal(unet(x), loaded2["deform"](x))


def test_checkpoint_in_half_precision(tmp_path):
    """``half=True`` stores the weights in float16: the file is about half as large, the
    loaded model is float32 again with each weight its float16 rounding, and its output
    stays close to the original's."""
    affine, deform = tiny_models(seed=4)
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    save_checkpoint(full, affine=affine, deform=deform)
    save_checkpoint(half, affine=affine, deform=deform, half=True)
    raw = torch.load(half, weights_only=True)
    assert all(v.dtype == torch.float16 for v in raw["deform"]["state_dict"].values()
               if v.is_floating_point())
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half)
    for a, b in ((affine, loaded["affine"]), (deform, loaded["deform"])):
        for key, value in a.state_dict().items():
            got = b.state_dict()[key]
            assert got.dtype == value.dtype == torch.float32
            assert torch.equal(got, value.half().float()), key
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 2, 16, 16, 16))).float()
    with torch.no_grad():
        ref, out = deform(x, 0.5), loaded["deform"](x, 0.5)
    assert not torch.equal(ref, out)  # the rounding is real
    assert float((ref - out).abs().max()) < 1e-2 * float(ref.abs().max())


def test_checkpoint_rejects_foreign_files(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, plain)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    good = tmp_path / "good.pt"
    affine, _ = tiny_models()
    save_checkpoint(good, affine=affine)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    keras = tmp_path / "keras.h5"
    write_affine_file(keras, det_arrays())
    for path in (plain, noise, truncated, keras, tmp_path / "missing.pt"):
        with pytest.raises(WeightsError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)


def test_checkpoint_rejects_mismatched_weights(tmp_path):
    affine, _ = tiny_models()
    path = tmp_path / "a.pt"
    save_checkpoint(path, affine=affine)
    raw = torch.load(path, weights_only=True)
    raw["affine"]["config"]["num_feat"] = 7
    bad = tmp_path / "bad.pt"
    torch.save(raw, bad)
    with pytest.raises(WeightsError, match="bad.pt"):
        load_checkpoint(bad)
    raw["affine"]["class"] = "Something"
    torch.save(raw, bad)
    with pytest.raises(WeightsError, match="Something"):
        load_checkpoint(bad)
    # Corrupted configurations and entries.
    for corrupt in ({**raw["affine"], "class": "AffineDetector",
                     "config": {**raw["affine"]["config"], "bogus": 1}},
                    {"class": "UNet", "config": {"enc_nf": [4, 4], "dec_nf": [4]}},
                    "junk"):
        torch.save({**raw, "affine": corrupt}, bad)
        with pytest.raises(WeightsError, match="bad.pt"):
            load_checkpoint(bad)


# --------------------------------------------------------------------------------------
# 4. Geometry of the affine head
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("npts", [6, 20])
def test_fit_affine_recovers_known_affine(npts):
    rng = np.random.default_rng(npts)
    m = random_affine(rng)
    tgt = torch.from_numpy(rng.normal(0, 10, (npts, 3)))
    src = apply(m, tgt)
    weights = torch.from_numpy(rng.uniform(0.1, 2.0, npts))
    fit = fit_affine(src[None], tgt[None], weights[None])
    assert fit.shape == (1, 4, 4)
    torch.testing.assert_close(fit[0], m, atol=1e-9, rtol=1e-9)
    # Direction: it maps tgt onto src, not the reverse.
    assert not torch.allclose(fit_affine(tgt[None], src[None], weights[None])[0], m, atol=1e-3)


def test_fit_affine_is_weighted():
    """With a perturbed point, its weight changes the least-squares fit."""
    rng = np.random.default_rng(1)
    m = random_affine(rng)
    tgt = torch.from_numpy(rng.normal(0, 10, (12, 3)))
    src = apply(m, tgt)
    src[0] += 3.0
    w = torch.ones(12, dtype=torch.float64)
    low = w.clone()
    low[0] = 1e-9
    err_low = (fit_affine(src[None], tgt[None], low[None])[0] - m).abs().max()
    err_one = (fit_affine(src[None], tgt[None], w[None])[0] - m).abs().max()
    assert err_low < 1e-6 < err_one


def test_symmetric_affine_of_related_points():
    rng = np.random.default_rng(2)
    m = random_affine(rng)
    cen_2 = torch.from_numpy(rng.normal(0, 10, (2, 16, 3)))
    cen_1 = apply(m, cen_2)
    weights = torch.from_numpy(rng.uniform(0.1, 1.0, (2, 16)))
    out = symmetric_affine(cen_1, cen_2, weights)
    assert out.shape == (2, 4, 4)
    torch.testing.assert_close(out, m.expand(2, 4, 4), atol=1e-9, rtol=1e-9)


def test_barycenters_one_hot_and_empty():
    shape = (5, 6, 7)
    feat = torch.zeros((1, 3, *shape), dtype=torch.float64)
    feat[0, 0, 1, 4, 6] = 2.5
    feat[0, 1, 0, 0, 0] = 1.0
    cen = barycenters(feat)
    assert cen.shape == (1, 3, 3)

    def expected(idx):
        return torch.tensor([(i - (s - 1) / 2) / s for i, s in zip(idx, shape, strict=True)],
                            dtype=torch.float64)

    torch.testing.assert_close(cen[0, 0], expected((1, 4, 6)))
    torch.testing.assert_close(cen[0, 1], expected((0, 0, 0)))
    assert torch.equal(cen[0, 2], torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(cen).all()
    # Two equal masses: the midpoint.
    feat[0, 2, 0, 0, 0] = feat[0, 2, 4, 0, 0] = 1.0
    torch.testing.assert_close(barycenters(feat)[0, 2, 0], torch.tensor(0.0, dtype=torch.float64))


def test_rigid_part():
    rng = np.random.default_rng(3)
    m = random_affine(rng, scale=0.4)[None]
    assert torch.linalg.det(m[0, :3, :3]) > 0
    r = rigid_part(m)
    rot = r[0, :3, :3]
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.det(rot), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(r[0, :, 3], m[0, :, 3])
    torch.testing.assert_close(r[0, 3], m[0, 3])
    assert not torch.allclose(rot, m[0, :3, :3], atol=1e-3)

    # A rotation (with translation) is its own rigid part.
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    rigid = torch.eye(4, dtype=torch.float64)
    rigid[:3, :3] = torch.from_numpy(q)
    rigid[:3, 3] = torch.tensor([1.0, -2.0, 3.0])
    torch.testing.assert_close(rigid_part(rigid[None])[0], rigid, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------------------
# 5. Official layer widths
# --------------------------------------------------------------------------------------


def test_official_layer_channels():
    chans = UNetConfig().layer_channels()
    assert len(chans) == 13
    assert [c for c, _ in chans[:4]] == [2, 256, 256, 256]
    assert [c for c, _ in chans[4:8]] == [256, 512, 512, 512]
    assert chans[8] == (512, 256)
    assert chans[9:12] == [(256, 256)] * 3
    assert chans[12] == (256, 3)
    assert all(o == 256 for _, o in chans[:12])


def test_pooled_unet_field_convention():
    """A U-Net run on the input pooled by 2 returns its field upsampled to the input grid in
    input voxels: pooled voxel ``k`` sits at input voxel ``2 k + 0.5``, so a field ``a k``
    (pooled voxels) becomes ``a (j - 0.5)`` (input voxels) inside the grid."""
    from synthmorph_nipype.models.joint import unet_forward

    a = 0.3
    seen = []

    def field(t):  # stands in for the network: a displacement linear in the first index
        seen.append(t.shape)
        k = torch.arange(t.shape[2], dtype=t.dtype)[:, None, None].expand(t.shape[2:])
        return torch.stack([a * k, torch.zeros_like(k), torch.ones_like(k)])[None]

    x = torch.rand(1, 2, 16, 16, 16)
    out = unet_forward(x, [field], 0, prepool=2)
    assert seen == [torch.Size([1, 2, 8, 8, 8])] and out.shape == (1, 3, 16, 16, 16)
    j = torch.arange(16, dtype=out.dtype)
    assert torch.allclose(out[0, 0, 1:-1, 5, 5], a * (j[1:-1] - 0.5), atol=1e-6)
    assert torch.allclose(out[0, 2], torch.full_like(out[0, 2], 2.0))  # 1 pooled voxel = 2


def test_unet_on_mind_descriptors(tmp_path):
    """``input_features="mind"``: the U-Net sees six MIND descriptors per image (12 input
    channels), so its field is the same for a pair whose contrast is inverted and differs
    from the intensity U-Net's; prepool computes them on the pooled grid; the setting
    survives a checkpoint; an unknown kind is refused."""
    from synthmorph_nipype.models.layers import mind_channels

    config = dataclasses.replace(TINY_UNET, input_features="mind")
    assert config.layer_channels()[0][0] == 12 and TINY_UNET.layer_channels()[0][0] == 2
    torch.manual_seed(0)
    model = HyperUNet(config)
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        out = model(x, 0.5)
        assert torch.allclose(out, model(1 - x, 0.5), atol=1e-4)
        plain = HyperUNet(TINY_UNET)
        assert not torch.allclose(plain(x, 0.5), plain(1 - x, 0.5), atol=1e-4)
        # what the first convolution sees: MIND of each channel of the (pooled) input
        seen = []
        hook = model.convs[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        pooled = HyperUNet(dataclasses.replace(config, prepool=2))
        pooled.load_state_dict(model.state_dict())
        hook.remove()
        hook = pooled.convs[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        pooled(x, 0.5)
        hook.remove()
        assert torch.allclose(seen[0], mind_channels(torch.nn.functional.avg_pool3d(x, 2)))
    save_checkpoint(tmp_path / "mind.pt", deform=model)
    loaded = load_checkpoint(tmp_path / "mind.pt")["deform"]
    assert loaded.config.input_features == "mind"
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.5), out)
        unet = model.specialize(0.5)
        assert torch.allclose(unet(x), out, atol=1e-5)
    with pytest.raises(ValueError, match="unknown input features 'sobel'"):
        dataclasses.replace(TINY_UNET, input_features="sobel")


def test_detector_on_mind_descriptors(tmp_path):
    """A detector with ``input_features="mind"`` sees six MIND descriptors per image: its
    first convolution takes 6 channels (the intensity detector's 1) and receives the
    descriptors, the same for the contrast inverted, so its features stay too; a
    checkpoint keeps the setting."""
    config = dataclasses.replace(TINY_AFFINE, input_features="mind")
    torch.manual_seed(1)
    det, plain = AffineDetector(config), AffineDetector(TINY_AFFINE)
    assert det.enc[0].in_channels == 6 and plain.enc[0].in_channels == 1
    i = torch.linspace(0, 1, 32)
    img = (i.view(-1, 1, 1) * (0.5 + 0.5 * i.view(1, -1, 1)) + 0.2 * i.view(1, 1, -1))
    img = (img / img.max() + 0.05 * torch.rand(32, 32, 32))[None, None]
    from synthmorph_nipype.models.layers import mind_channels

    seen = []
    hook = det.enc[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        assert torch.allclose(det.features(img), det.features(1 - img), atol=1e-4)
    hook.remove()
    assert torch.allclose(seen[0], mind_channels(img)) and seen[0].std() > 0.01
    assert torch.allclose(seen[0], seen[1], atol=1e-4)  # the inverted image looks the same
    save_checkpoint(tmp_path / "det.pt", affine=det)
    loaded = load_checkpoint(tmp_path / "det.pt")["affine"]
    assert loaded.config.input_features == "mind"
    with torch.no_grad():
        assert torch.equal(loaded.features(img), det.features(img))
    with pytest.raises(ValueError, match="unknown input features 'edges'"):
        dataclasses.replace(TINY_AFFINE, input_features="edges")
