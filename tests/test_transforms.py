"""Transform files: our writers against independent readers (SimpleITK, nitransforms)."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nitransforms.io.itk import ITKCompositeH5
from nitransforms.io.lta import FSLinearTransformArray
from nitransforms.linear import load as nt_linear_load
from nitransforms.manip import load as nt_chain_load
from nitransforms.nonlinear import load as nt_field_load

from synthmorph_nipype.errors import InputError
from synthmorph_nipype.ops.rotation import rotation
from synthmorph_nipype.transforms import (
    Affine,
    Chain,
    DisplacementField,
    ImageGrid,
    dense_field,
    load_transform,
    read_lta,
    save_transform,
    write_lta,
)
from synthmorph_nipype.transforms.itk import read_itk_h5

FLIP = np.array([-1.0, -1.0, 1.0])
AFFINE_TOL = 1e-4
FIELD_TOL = 1e-3


# --------------------------------------------------------------------------- helpers
def random_affine(rng: np.random.Generator) -> np.ndarray:
    """Rotation <= 15 deg per axis, shift <= 20 mm, scale 0.9-1.1, shear <= 0.1."""
    shear = np.eye(3)
    shear[np.triu_indices(3, 1)] = rng.uniform(-0.1, 0.1, 3)
    m = np.eye(4)
    m[:3, :3] = (
        rotation(rng.uniform(-15, 15, 3)) @ shear @ np.diag(rng.uniform(0.9, 1.1, 3))
    )
    m[:3, 3] = rng.uniform(-20, 20, 3)
    return m


def make_grid(kind: str, shape=(24, 28, 20)) -> ImageGrid:
    """An RAS, oblique anisotropic, or LPS grid roughly centred on the origin."""
    if kind == "ras":
        lin = np.diag([1.0, 1.0, 1.0])
    elif kind == "oblique":
        lin = rotation([12.0, -9.0, 14.0]) @ np.diag([1.2, 1.0, 1.5])
    elif kind == "lps":
        lin = np.diag([-1.1, -1.0, 1.3])
    else:
        raise ValueError(kind)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = -lin @ (np.asarray(shape) / 2) + [3.0, -5.0, 7.0]
    return ImageGrid.make(shape, aff)


def smooth_field(grid: ImageGrid, rng: np.random.Generator, amp: float = 3.0) -> np.ndarray:
    """A smooth random (X, Y, Z, 3) displacement field of a few millimetres."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    field = np.zeros((*grid.shape, 3))
    for c in range(3):
        for _ in range(3):
            freq = rng.uniform(0.05, 0.3, 3)
            phase = rng.uniform(0, 2 * np.pi)
            field[..., c] += amp / 3 * np.sin(idx @ freq + phase)
    return field.astype(np.float32)


def inner_points(grid: ImageGrid, rng: np.random.Generator, n: int = 200) -> np.ndarray:
    """Random RAS points at least two voxels inside the grid."""
    idx = rng.uniform(2, np.asarray(grid.shape) - 3, size=(n, 3))
    return idx @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def node_points(grid: ImageGrid, rng: np.random.Generator, n: int = 200) -> np.ndarray:
    """Random voxel-centre RAS points at least two voxels inside the grid."""
    idx = np.stack([rng.integers(2, s - 2, n) for s in grid.shape], -1).astype(float)
    return idx @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def world_cube(rng: np.random.Generator, n: int = 200, half: float = 60.0) -> np.ndarray:
    return rng.uniform(-half, half, size=(n, 3))


def sitk_map(tx: sitk.Transform, points_ras: np.ndarray) -> np.ndarray:
    """Map RAS points through an ITK (LPS) transform."""
    return np.array([tx.TransformPoint(tuple(p * FLIP)) for p in points_ras]) * FLIP


def sitk_field_transform(path) -> sitk.Transform:
    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(img)


def random_field(kind: str, seed: int) -> DisplacementField:
    grid = make_grid(kind)
    return DisplacementField(grid, smooth_field(grid, np.random.default_rng(seed)))


# --------------------------------------------------------------------------- base objects
def test_chain_applies_last_member_first():
    rng = np.random.default_rng(1)
    a, b = Affine(random_affine(rng)), Affine(random_affine(rng))
    pts = world_cube(rng)
    chain = Chain([a, b])
    assert np.allclose(chain.map(pts), a.map(b.map(pts)))
    assert not np.allclose(chain.map(pts), b.map(a.map(pts)), atol=1e-3)
    assert np.allclose(chain.as_affine().map(pts), chain.map(pts))
    assert np.allclose(a.inverse().map(a.map(pts)), pts)
    assert Chain([a, random_field("ras", 0)]).as_affine() is None


def test_field_is_zero_off_grid_and_exact_on_nodes():
    field = random_field("oblique", 2)
    grid = field.grid
    far = grid.affine[:3, 3] - 50 * grid.affine[:3, :3].sum(axis=1)
    assert np.allclose(field.map(far), far)
    idx = np.array([[3, 4, 5], [10, 2, 7]])
    pts = idx @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    assert np.allclose(field.map(pts) - pts, field.field[idx[:, 0], idx[:, 1], idx[:, 2]],
                       atol=1e-5)


def test_map_grid_reads_a_field_on_its_own_grid_as_map_interpolates_it():
    """Mapping a grid's voxel centres: a field on that very grid gives its stored values
    (what map interpolates there), on another grid it interpolates, and a chain lets its
    last member map the grid."""
    rng = np.random.default_rng(5)
    field = random_field("oblique", 3)
    grid = field.grid
    pts = grid.world_points((2, 5)).reshape(-1, 3)
    np.testing.assert_allclose(field.map_grid(grid, (2, 5)), field.map(pts), atol=1e-5)
    assert not np.allclose(field.map_grid(grid, (2, 5)), pts, atol=1e-3)  # it moves them
    shifted = grid.affine.copy()  # half-voxel steps inside the field: interpolated
    shifted[:3, 3] += grid.affine[:3, :3] @ [2.5, 1.3, 3.2]
    other = ImageGrid.make((6, 5, 4), shifted)
    on_other = other.world_points().reshape(-1, 3)
    np.testing.assert_allclose(field.map_grid(other), field.map(on_other), atol=1e-12)
    assert not np.allclose(field.map_grid(other), on_other, atol=1e-3)
    chain = Chain([Affine(random_affine(rng)), field])
    np.testing.assert_allclose(chain.map_grid(grid, (0, 3)),
                               chain.map(grid.world_points((0, 3)).reshape(-1, 3)), atol=1e-4)


def test_image_grid_from_image():
    grid = make_grid("oblique")
    img = nib.Nifti1Image(np.zeros((*grid.shape, 2), np.float32), grid.affine)
    got = ImageGrid.from_image(img)
    assert got.shape == grid.shape and np.allclose(got.affine, grid.affine)


# --------------------------------------------------------------------------- ITK affines
@pytest.mark.parametrize("suffix", [".txt", ".mat"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affine_itk_files_read_by_sitk_and_nitransforms(tmp_path, suffix, seed):
    rng = np.random.default_rng(seed)
    affine = Affine(random_affine(rng))
    path = tmp_path / f"xfm{suffix}"
    save_transform(path, Chain([affine]))
    pts = world_cube(rng)
    expected = affine.map(pts)

    assert np.abs(sitk_map(sitk.ReadTransform(str(path)), pts) - expected).max() < AFFINE_TOL
    assert np.abs(nt_linear_load(path, fmt="itk").map(pts) - expected).max() < AFFINE_TOL

    loaded = load_transform(path)
    assert loaded.reference is None
    assert np.abs(loaded.chain.map(pts) - expected).max() < 1e-9


@pytest.mark.parametrize("suffix", [".txt", ".mat"])
def test_affine_written_by_sitk_with_centre(tmp_path, suffix):
    rng = np.random.default_rng(7)
    m = random_affine(rng)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(m[:3, :3].ravel().tolist())
    tx.SetTranslation(m[:3, 3].tolist())
    tx.SetCenter([12.0, -30.0, 8.0])
    path = tmp_path / f"sitk{suffix}"
    tx.WriteTransform(str(path))
    pts = world_cube(rng)
    got = load_transform(path).chain.map(pts)
    assert np.abs(got - sitk_map(tx, pts)).max() < AFFINE_TOL


def test_matrix_offset_transform_base_text(tmp_path):
    path = tmp_path / "mo.txt"
    path.write_text(
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: MatrixOffsetTransformBase_double_3_3\n"
        "Parameters: 1 0 0 0 0 -1 0 1 0 1 2 3\nFixedParameters: 10 20 30\n"
    )
    tx = sitk.AffineTransform(3)
    tx.SetMatrix([1, 0, 0, 0, 0, -1, 0, 1, 0])
    tx.SetTranslation([1, 2, 3])
    tx.SetCenter([10, 20, 30])
    pts = world_cube(np.random.default_rng(3))
    assert np.abs(load_transform(path).chain.map(pts) - sitk_map(tx, pts)).max() < 1e-9


def test_affine_formats_refuse_fields(tmp_path):
    for suffix in (".txt", ".mat", ".lta"):
        with pytest.raises(InputError, match=f"xfm{suffix}"):
            save_transform(tmp_path / f"xfm{suffix}", Chain([random_field("ras", 0)]),
                           source=make_grid("ras"), reference=make_grid("ras"))


# --------------------------------------------------------------------------- NIfTI fields
@pytest.mark.parametrize("kind", ["ras", "oblique", "lps"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_field_nifti_read_by_sitk_and_nitransforms(tmp_path, kind, suffix):
    rng = np.random.default_rng(11)
    field = random_field(kind, 5)
    path = tmp_path / f"warp{suffix}"
    save_transform(path, Chain([field]))

    img = nib.load(path)
    assert img.shape == (*field.grid.shape, 1, 3)
    assert img.get_data_dtype() == np.float32
    assert int(img.header["intent_code"]) == 1007
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert np.allclose(img.affine, field.grid.affine, atol=1e-5)

    pts = inner_points(field.grid, rng)
    expected = field.map(pts)
    assert np.abs(expected - pts).max() > 0.5  # the field does move points
    got = sitk_map(sitk_field_transform(path), pts)
    assert np.abs(got - expected).max() < FIELD_TOL

    nodes = node_points(field.grid, rng)
    got = nt_field_load(path, fmt="itk").map(nodes)
    assert np.abs(got - field.map(nodes)).max() < FIELD_TOL

    loaded = load_transform(path)
    assert loaded.reference.same_as(field.grid)
    assert np.abs(loaded.chain.map(pts) - expected).max() < 1e-5


def test_field_border_matches_itk(tmp_path):
    """Half-voxel border, edge replication and zero displacement off the field."""
    rng = np.random.default_rng(4)
    field = random_field("oblique", 9)
    path = tmp_path / "warp.nii.gz"
    save_transform(path, field)
    idx = rng.uniform(-1.5, np.asarray(field.grid.shape) + 0.5, size=(3000, 3))
    pts = idx @ field.grid.affine[:3, :3].T + field.grid.affine[:3, 3]
    got = sitk_map(sitk_field_transform(path), pts)
    assert np.abs(got - field.map(pts)).max() < FIELD_TOL


def test_field_written_by_sitk(tmp_path):
    rng = np.random.default_rng(8)
    field = random_field("oblique", 3)
    grid = field.grid
    lps = field.field.astype(np.float64) * FLIP
    img = sitk.GetImageFromArray(lps.transpose(2, 1, 0, 3), isVector=True)
    img.SetSpacing(grid.zooms.tolist())
    img.SetOrigin((grid.affine[:3, 3] * FLIP).tolist())
    img.SetDirection((FLIP[:, None] * grid.affine[:3, :3] / grid.zooms).ravel().tolist())
    path = tmp_path / "sitk_warp.nii.gz"
    sitk.WriteImage(img, str(path))
    pts = inner_points(grid, rng)
    got = load_transform(path).chain.map(pts)
    assert np.abs(got - sitk_map(sitk_field_transform(path), pts)).max() < FIELD_TOL


@pytest.mark.parametrize("intent, is_lps", [(1006, False), (1007, True)])
def test_field_nifti_4d_by_intent(tmp_path, intent, is_lps):
    field = random_field("oblique", 6)
    img = nib.Nifti1Image(field.field, field.grid.affine)
    img.header.set_intent(intent)
    path = tmp_path / "warp4d.nii.gz"
    nib.save(img, path)
    nodes = node_points(field.grid, np.random.default_rng(0))
    disp = load_transform(path).chain.map(nodes) - nodes
    expected = field.map(nodes) - nodes
    if is_lps:
        expected = expected * FLIP
    assert np.abs(disp - expected).max() < 1e-5


def test_affine_chain_to_dense_field(tmp_path):
    rng = np.random.default_rng(12)
    affine = Affine(random_affine(rng))
    grid = make_grid("lps")
    path = tmp_path / "dense.nii.gz"
    save_transform(path, Chain([affine]), reference=grid)
    pts = inner_points(grid, rng)
    got = sitk_map(sitk_field_transform(path), pts)
    assert np.abs(got - affine.map(pts)).max() < FIELD_TOL
    assert np.allclose(dense_field(affine, grid).map(pts), affine.map(pts), atol=FIELD_TOL)
    with pytest.raises(InputError, match="dense2.nii.gz"):
        save_transform(tmp_path / "dense2.nii.gz", Chain([affine]))


# --------------------------------------------------------------------------- HDF5 composite
def test_h5_composite_order_matches_sitk_and_nitransforms(tmp_path):
    rng = np.random.default_rng(21)
    affine = Affine(random_affine(rng))
    field = random_field("oblique", 13)
    chain = Chain([affine, field])
    path = tmp_path / "composite.h5"
    save_transform(path, chain)

    pts = inner_points(field.grid, rng)
    expected = affine.map(field.map(pts))
    assert np.allclose(chain.map(pts), expected)
    assert np.abs(affine.map(pts) - expected).max() > 0.5  # the field matters here

    tx = sitk.ReadTransform(str(path))
    assert np.abs(sitk_map(tx, pts) - expected).max() < FIELD_TOL

    parts = ITKCompositeH5.from_filename(path)
    assert len(parts) == 2
    nodes = node_points(field.grid, rng)
    got = nt_chain_load(path, fmt="itk").map(nodes)
    assert np.abs(got - chain.map(nodes)).max() < FIELD_TOL

    loaded = load_transform(path)
    assert [type(t) for t in loaded.chain] == [Affine, DisplacementField]
    assert loaded.reference.same_as(field.grid)
    assert np.abs(loaded.chain.map(pts) - expected).max() < 1e-5


def test_h5_layout(tmp_path):
    path = tmp_path / "layout.h5"
    save_transform(path, Chain([Affine(np.eye(4)), random_field("lps", 1)]))
    with h5py.File(path, "r") as f:
        for name in ("ITKVersion", "HDFVersion", "OSName"):
            assert f[name].shape == (1,)
        group = f["TransformGroup"]
        assert sorted(group) == ["0", "1", "2"]
        assert group["0/TransformType"][0] == b"CompositeTransform_double_3_3"
        assert group["1/TransformType"][0].startswith(b"AffineTransform")
        assert group["2/TransformType"][0].startswith(b"DisplacementFieldTransform")
        params = group["2/TransformParameters"]
        # dense fields are stored in their own (float32) precision
        assert params.dtype == (np.float32 if params.size > 4096 else np.float64)
        assert group["1/TransformParameters"].dtype == np.float64
        assert group["2/TransformFixedParameters"].shape == (18,)


@pytest.mark.filterwarnings("ignore:Reference space not set")
def test_h5_affines_order(tmp_path):
    rng = np.random.default_rng(5)
    a, b = Affine(random_affine(rng)), Affine(random_affine(rng))
    path = tmp_path / "two.h5"
    save_transform(path, Chain([a, b]))
    pts = world_cube(rng)
    expected = a.map(b.map(pts))
    assert np.abs(sitk_map(sitk.ReadTransform(str(path)), pts) - expected).max() < AFFINE_TOL
    assert np.abs(nt_chain_load(path, fmt="itk").map(pts) - expected).max() < AFFINE_TOL
    loaded = load_transform(path)
    assert loaded.reference is None
    assert np.abs(loaded.chain.map(pts) - expected).max() < 1e-9


def test_h5_written_by_sitk(tmp_path):
    rng = np.random.default_rng(22)
    field = random_field("lps", 17)
    grid = field.grid
    img = sitk.GetImageFromArray(
        (field.field.astype(np.float64) * FLIP).transpose(2, 1, 0, 3), isVector=True
    )
    img.SetSpacing(grid.zooms.tolist())
    img.SetOrigin((grid.affine[:3, 3] * FLIP).tolist())
    img.SetDirection((FLIP[:, None] * grid.affine[:3, :3] / grid.zooms).ravel().tolist())
    m = random_affine(rng)
    aff = sitk.AffineTransform(3)
    aff.SetMatrix(m[:3, :3].ravel().tolist())
    aff.SetTranslation(m[:3, 3].tolist())
    aff.SetCenter([5.0, -7.0, 2.0])
    composite = sitk.CompositeTransform([aff, sitk.DisplacementFieldTransform(img)])
    path = tmp_path / "sitk.h5"
    composite.WriteTransform(str(path))

    chain = read_itk_h5(path)
    pts = inner_points(grid, rng)
    assert np.abs(chain.map(pts) - sitk_map(composite, pts)).max() < FIELD_TOL


# --------------------------------------------------------------------------- LTA
def _ras_grids():
    src = make_grid("oblique", shape=(30, 26, 22))
    dst = make_grid("lps", shape=(28, 32, 24))
    return src, dst


@pytest.mark.parametrize("seed", [0, 1])
def test_lta_type1_roundtrip_and_nitransforms(tmp_path, seed):
    rng = np.random.default_rng(seed)
    src, dst = _ras_grids()
    matrix = random_affine(rng)  # src RAS -> dst RAS
    path = tmp_path / "xfm.lta"
    write_lta(path, matrix, src, dst)

    lines = path.read_text().splitlines()
    assert lines[0] == "type      = 1 # LINEAR_RAS_TO_RAS"
    assert lines[4] == "1 4 4"
    cras = [float(v) for v in lines[17].split("=")[1].split()]
    assert lines[17].startswith("cras")
    assert np.allclose(cras, src.affine[:3, :3] @ (np.asarray(src.shape) / 2) + src.affine[:3, 3])

    got, got_src, got_dst = read_lta(path)
    assert np.allclose(got, matrix, atol=1e-12)
    assert got_src.same_as(src, atol=1e-9) and got_dst.same_as(dst, atol=1e-9)

    nt = FSLinearTransformArray.from_filename(path)
    assert np.allclose(nt.xforms[0]["src"].as_affine(), src.affine, atol=1e-5)
    assert np.allclose(nt.xforms[0]["dst"].as_affine(), dst.affine, atol=1e-5)
    pts = world_cube(rng)
    pull = nt_linear_load(path, fmt="fs")  # nitransforms: RAS pull-back = inv(matrix)
    loaded = load_transform(path)
    assert loaded.reference.same_as(dst)
    assert np.abs(pull.map(pts) - loaded.chain.map(pts)).max() < AFFINE_TOL
    assert np.abs(matrix[:3, :3] @ loaded.chain.map(pts).T + matrix[:3, 3:] - pts.T).max() < 1e-9


def test_lta_type0_read(tmp_path):
    rng = np.random.default_rng(3)
    src, dst = _ras_grids()
    matrix = random_affine(rng)
    path1 = tmp_path / "ras.lta"
    write_lta(path1, matrix, src, dst)
    vox = np.linalg.inv(dst.affine) @ matrix @ src.affine
    lines = path1.read_text().splitlines()
    lines[0] = "type      = 0 # LINEAR_VOX_TO_VOX"
    lines[5:9] = [" ".join(f"{v:.15e}" for v in row) for row in vox]
    path0 = tmp_path / "vox.lta"
    path0.write_text("\n".join(["# transform file written by a test", *lines]) + "\n")

    got, _, _ = read_lta(path0)
    assert np.allclose(got, matrix, atol=1e-9)
    pts = world_cube(rng)
    assert np.abs(nt_linear_load(path0, fmt="fs").map(pts) - load_transform(path0).chain.map(
        pts)).max() < AFFINE_TOL


def test_save_lta_writes_inverse_of_pull_back(tmp_path):
    rng = np.random.default_rng(9)
    src, dst = _ras_grids()
    pull = Affine(random_affine(rng))
    path = tmp_path / "out.lta"
    save_transform(path, Chain([pull]), source=src, reference=dst)
    matrix, got_src, got_dst = read_lta(path)
    assert np.allclose(matrix, np.linalg.inv(pull.matrix))
    assert got_src.same_as(src) and got_dst.same_as(dst)
    pts = world_cube(rng)
    assert np.abs(nt_linear_load(path, fmt="fs").map(pts) - pull.map(pts)).max() < AFFINE_TOL
    with pytest.raises(InputError, match="nogrid.lta"):
        save_transform(tmp_path / "nogrid.lta", Chain([pull]))


# --------------------------------------------------------------------------- malformed
def test_truncated_lta(tmp_path):
    src, dst = _ras_grids()
    full = tmp_path / "full.lta"
    write_lta(full, np.eye(4), src, dst)
    lines = full.read_text().splitlines()
    for cut in (3, 7, 12, len(lines) - 2):
        path = tmp_path / f"cut{cut}.lta"
        path.write_text("\n".join(lines[:cut]) + "\n")
        with pytest.raises(InputError, match=f"cut{cut}.lta"):
            load_transform(path)


def test_not_a_transform(tmp_path):
    cases = {
        "notes.txt": b"hello, this is not a transform\n",
        "garbage.mat": b"\x00\x01 not matlab at all",
        "garbage.nii.gz": b"not gzip",
        "garbage.h5": b"not hdf5",
        "garbage.lta": b"type = 1\nnxforms = 1\nmean = a b c\n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            load_transform(path)


def test_h5_without_transform_group(tmp_path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("something", data=np.zeros(3))
    with pytest.raises(InputError, match="empty.h5"):
        load_transform(path)


def test_wrong_image_shape_and_unknown_suffix(tmp_path):
    path = tmp_path / "scalar.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match="scalar.nii.gz"):
        load_transform(path)
    with pytest.raises(InputError, match=r"xfm\.tfm.*\.lta"):
        load_transform(tmp_path / "xfm.tfm")
    with pytest.raises(InputError, match=r"out\.json"):
        save_transform(tmp_path / "out.json", Chain([Affine(np.eye(4))]))
    with pytest.raises(InputError, match="missing.txt"):
        load_transform(tmp_path / "missing.txt")


def test_transform_files_need_no_torch(tmp_path):
    """Reading and writing transform files (and mapping points through affines) must not
    load torch: a Nipype node that only converts a transform stays light."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from synthmorph_nipype.transforms import Affine, load_transform, save_transform\n"
        f"p = {str(tmp_path / 'x.txt')!r}\n"
        "save_transform(p, Affine(np.diag([2.0, 1.0, 1.0, 1.0])))\n"
        "t = load_transform(p).chain\n"
        "assert np.allclose(t.map([[1.0, 0, 0]]), [[2.0, 0, 0]])\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr
