"""Training label maps: random shapes and labels derived from nilearn's ICBM152 template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nilearn import datasets
from scipy import ndimage

from synthmorph_nipype.synthesis.labels import perlin_noise, random_shapes, template_labels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _neighbour_agreement(lab: torch.Tensor) -> float:
    """Fraction of axis-neighbour voxel pairs with the same label (spatial dims only)."""
    fracs = []
    for d in range(lab.ndim):
        n = lab.shape[d] - 1
        fracs.append((lab.narrow(d, 1, n) == lab.narrow(d, 0, n)).float().mean().item())
    return float(np.mean(fracs))


# ---------------------------------------------------------------- perlin noise


def test_perlin_noise_low_frequency_and_scale_ordering():
    coarse = perlin_noise((64, 64, 64), scales=(16, 32), generator=0)
    fine = perlin_noise((64, 64, 64), scales=(2,), generator=0)
    white = torch.randn(64, 64, 64, generator=torch.Generator().manual_seed(0))

    def corr(x):
        a, b = x[1:].flatten(), x[:-1].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert coarse.std() > 0.1
    assert corr(coarse) > 0.98
    assert 0.5 < corr(fine) < corr(coarse)
    assert abs(corr(white)) < 0.05
    assert torch.isfinite(coarse).all()


def test_perlin_noise_shapes_seed_and_errors():
    a = perlin_noise((10, 12), scales=(4,), generator=3, num=5)
    assert a.shape == (5, 10, 12) and a.dtype == torch.float32
    assert torch.equal(a, perlin_noise((10, 12), scales=(4,), generator=3, num=5))
    assert not torch.equal(a, perlin_noise((10, 12), scales=(4,), generator=4, num=5))
    # The five volumes are independent draws, not copies.
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError):
        perlin_noise((10,), scales=(4,))
    with pytest.raises(ValueError):
        perlin_noise((10, 10, 10), scales=(0,))


# ---------------------------------------------------------------- random shapes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_shapes_labels_volumes_and_smoothness(seed):
    lab = random_shapes((96, 96, 96), num_labels=(16, 26), generator=seed, batch=2)
    assert lab.shape == (2, 96, 96, 96) and lab.dtype == torch.int64
    for one in lab:
        n = int(one.max()) + 1
        assert 16 <= n <= 26
        counts = torch.bincount(one.flatten(), minlength=n)
        assert int(one.min()) == 0
        # Every label 0..n-1 is present with a reasonable volume (>= 0.2% of the map).
        assert counts.min().item() >= 0.002 * one.numel()
        assert _neighbour_agreement(one) > 0.85


def test_random_shapes_fixed_count_2d_and_no_warp():
    lab = random_shapes((128, 128), num_labels=7, generator=5, batch=3, warp=0)
    assert lab.shape == (3, 128, 128)
    for one in lab:
        assert torch.equal(torch.unique(one), torch.arange(7))
        assert _neighbour_agreement(one) > 0.9


def test_random_shapes_reproducible_and_seed_dependent():
    a = random_shapes((48, 40, 32), generator=11)
    b = random_shapes((48, 40, 32), generator=torch.Generator().manual_seed(11))
    c = random_shapes((48, 40, 32), generator=12)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5
    # Maps in one batch differ from each other.
    two = random_shapes((48, 40, 32), generator=11, batch=2)
    assert torch.equal(two[0], a[0])
    assert (two[0] != two[1]).float().mean() > 0.5


def test_random_shapes_warp_changes_boundaries_only_smoothly():
    plain = random_shapes((64, 64, 64), num_labels=10, generator=2, warp=0)
    warped = random_shapes((64, 64, 64), num_labels=10, generator=2, warp=4)
    changed = (plain != warped).float().mean().item()
    assert 0.01 < changed < 0.5
    assert _neighbour_agreement(warped[0]) > 0.85


@pytest.mark.parametrize("device", DEVICES)
def test_random_shapes_device(device):
    lab = random_shapes((32, 32, 32), num_labels=(3, 5), generator=0, device=device)
    assert lab.device.type == device
    noise = perlin_noise((16, 16, 16), scales=(4,), generator=0, device=device)
    assert noise.device.type == device
    if device != "cpu":
        # A CPU generator draws the same numbers whatever the output device.
        cpu = random_shapes((32, 32, 32), num_labels=(3, 5), generator=0, warp=0)
        dev = random_shapes((32, 32, 32), num_labels=(3, 5), generator=0, warp=0, device=device)
        assert (cpu != dev.cpu()).float().mean() < 0.001


def test_random_shapes_rejects_bad_counts():
    with pytest.raises(ValueError):
        random_shapes((8, 8, 8), num_labels=(5, 3))
    with pytest.raises(ValueError):
        random_shapes((8, 8, 8), num_labels=0)


# ---------------------------------------------------------------- template labels


@pytest.fixture(scope="module")
def template2():
    img = datasets.load_mni152_template(resolution=2)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=2).dataobj) > 0
    return img, mask


def _world_x(shape, affine):
    ijk = np.indices(shape, dtype=np.float64)
    return np.tensordot(affine[0, :3], ijk, axes=1) + affine[0, 3]


def test_template_labels_grid_and_names(template2):
    img, mask = template2
    lab, aff, names = template_labels(2)
    assert lab.shape == img.shape
    np.testing.assert_allclose(aff, img.affine)
    assert lab.dtype in (np.uint8, np.int16)
    assert set(np.unique(lab)) == set(names)
    assert names[0] == "background"
    assert 10 <= len(names) <= 20
    assert len(set(names.values())) == len(names)
    for k, name in names.items():
        if k:
            side, tissue, cluster = name.split("_")
            assert side in ("left", "right") and tissue in ("csf", "gm", "wm")
            assert int(cluster) >= 1
    # Brain labels exactly fill nilearn's brain mask.
    np.testing.assert_array_equal(lab > 0, mask)


def test_template_labels_tissue_fractions_and_subdivision(template2):
    img, mask = template2
    coarse, _, cnames = template_labels(2, subdivide=False)
    assert cnames == {0: "background", 1: "csf", 2: "gm", 3: "wm"}
    n = mask.sum()
    frac = {name: (coarse == k).sum() / n for k, name in cnames.items() if k}
    assert 0.3 < frac["gm"] < 0.65 and 0.3 < frac["wm"] < 0.6
    assert 0.02 < frac["csf"] < 0.2
    # 1 mm brain volume is plausible (litres) for the mask: 1.2-2.2 L.
    assert 1.2e6 < n * 8 < 2.2e6

    fine, _, fnames = template_labels(2, subdivide=True)
    merged = np.zeros_like(coarse)
    tissue_id = {"csf": 1, "gm": 2, "wm": 3}
    for k, name in fnames.items():
        if k:
            merged[fine == k] = tissue_id[name.split("_")[1]]
    np.testing.assert_array_equal(merged, coarse)

    # Intensity clusters are ordered dark to bright within each tissue and side.
    t1 = np.asarray(img.dataobj, dtype=np.float64)
    groups: dict[str, list[tuple[int, float]]] = {}
    for k, name in fnames.items():
        if k:
            side, tissue, cluster = name.split("_")
            assert (fine == k).sum() > 0.005 * n
            groups.setdefault(f"{side}_{tissue}", []).append((int(cluster), t1[fine == k].mean()))
    for members in groups.values():
        means = [m for _, m in sorted(members)]
        assert len(means) >= 2 and np.all(np.diff(means) > 0)


def test_template_labels_hemispheres(template2):
    _, mask = template2
    lab, aff, names = template_labels(2)
    x = _world_x(lab.shape, aff)
    left = np.isin(lab, [k for k, v in names.items() if v.startswith("left_")])
    right = np.isin(lab, [k for k, v in names.items() if v.startswith("right_")])
    assert left.any() and right.any()
    assert np.all(x[left] < 0) and np.all(x[right] >= 0)
    np.testing.assert_array_equal(left | right, mask)
    assert abs(left.sum() - right.sum()) < 0.1 * mask.sum()


def test_template_labels_cached_copy_is_safe():
    a, _, _ = template_labels(2)
    a[...] = 0
    b, _, _ = template_labels(2)
    assert b.any()


def test_template_labels_head(template2):
    _, mask = template2
    brain, aff, bnames = template_labels(2)
    lab, aff2, names = template_labels(2, head=True, generator=0)
    np.testing.assert_array_equal(aff, aff2)
    head_ids = sorted(set(names) - set(bnames))
    assert [names[k] for k in head_ids] == ["extracerebral_csf", "skull", "scalp"]
    assert set(np.unique(lab)) == set(names)
    # Inside the brain nothing changes; head labels only outside it.
    np.testing.assert_array_equal(lab[mask], brain[mask])
    head = np.isin(lab, head_ids)
    assert not np.any(head & mask)
    # Background remains around the head.
    assert (lab == 0).mean() > 0.3
    # Every voxel on the brain's boundary has a head label within one voxel (2 mm).
    boundary = mask & ~ndimage.binary_erosion(mask, border_value=1)
    near_head = ndimage.binary_dilation(head, iterations=1)
    assert np.all(near_head[boundary])
    # Layers are ordered outward: mean distance from the brain grows CSF < skull < scalp.
    dist = ndimage.distance_transform_edt(~mask, sampling=(2, 2, 2))
    mean_d = [dist[lab == k].mean() for k in head_ids]
    assert mean_d[0] < mean_d[1] < mean_d[2]
    assert dist[head].max() < 40  # mm: a head, not a box
    # Reproducible with a seed, different with another.
    again, _, _ = template_labels(2, head=True, generator=0)
    other, _, _ = template_labels(2, head=True, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(lab, again)
    assert (lab != other).sum() > 1000
    np.testing.assert_array_equal(other[mask], brain[mask])


def test_template_labels_head_without_subdivision():
    lab, _, names = template_labels(2, head=True, subdivide=False, generator=0)
    assert names == {0: "background", 1: "csf", 2: "gm", 3: "wm",
                     4: "extracerebral_csf", 5: "skull", 6: "scalp"}
    assert set(np.unique(lab)) == set(names)


def test_template_labels_bad_resolution():
    with pytest.raises(ValueError):
        template_labels(3)
