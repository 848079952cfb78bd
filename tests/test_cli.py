"""The ``synthmorph`` command line, end to end.

Bad input must give one line on stderr naming the file (or the bad value), no traceback,
a non-zero exit code and no output file, not even a hidden temporary one. These cases run
``main()`` in-process (and, one case of each kind, the real CLI in a subprocess).
Successful runs call ``main()`` in-process with the tiny random-weight models of
``conftest.py`` and the smaller network extent (``-e 192``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pytest
import torch

from synthmorph_nipype.cli.main import main
from synthmorph_nipype.models.checkpoint import load_checkpoint
from synthmorph_nipype.transforms import (
    Affine,
    Chain,
    DisplacementField,
    load_transform,
    save_transform,
)

CLI = [sys.executable, "-m", "synthmorph_nipype.cli.main"]
TIMEOUT = 600


# --------------------------------------------------------------------------- helpers
def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without FreeSurfer (so no official weights are found)."""
    env = {k: v for k, v in os.environ.items() if k != "FREESURFER_HOME"}
    env.update(extra)
    return env


def listing(folder: Path) -> list[str]:
    """Every entry under ``folder``, hidden ones included, as relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def save(data, affine, path: Path) -> Path:
    nb.save(nb.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def blob(n: int = 40) -> np.ndarray:
    x = np.indices((n, n, n), dtype=np.float32) - (n - 1) / 2
    return np.exp(-(x**2).sum(0) / (2 * (n / 6) ** 2)).astype(np.float32)


def write_keras_affine(path: Path, model) -> None:
    """Save a feature detector the way Keras ``save_weights`` lays out HDF5 files."""
    convs = [*model.enc, *model.add, model.out]
    with h5py.File(path, "w") as f:
        names = [b"input_1"]
        f.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for i, conv in enumerate(convs):
            name = f"conv3d_{i + 7}"
            group = f.create_group(name)
            kernel = conv.weight.detach().numpy().transpose(2, 3, 4, 1, 0)
            group.create_dataset(f"{name}/kernel:0", data=kernel)
            group.create_dataset(f"{name}/bias:0", data=conv.bias.detach().numpy())
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            names.append(name.encode())
        f.attrs["layer_names"] = names
        f.attrs["backend"] = b"tensorflow"


@contextlib.contextmanager
def working_dir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_main(argv: list, **env: str) -> int:
    """``main(argv)`` in this process; torch's thread count and the environment restored."""
    threads = torch.get_num_threads()
    saved = dict(os.environ)
    os.environ.pop("FREESURFER_HOME", None)
    os.environ.update(env)
    try:
        return main([str(a) for a in argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    err = result.stderr
    assert result.returncode != 0, f"exit code 0; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {err!r}"
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "registration done" not in result.stdout


def load_matrix(path: Path) -> np.ndarray:
    affine = load_transform(path).chain.as_affine()
    assert affine is not None, f"{path} is not affine"
    return affine.matrix


# --------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inputs(template, tiny_weights, tmp_path_factory) -> dict[str, Path]:
    """Good and bad input files (made once; only read by the tests)."""
    d = tmp_path_factory.mktemp("inputs")
    tpl = nb.load(str(template))
    data = np.asarray(tpl.dataobj, dtype=np.float32)
    mov_affine = tpl.affine.copy()
    mov_affine[:3, :3] *= 2
    fix_affine = tpl.affine.copy()
    fix_affine[:3, 3] += tpl.affine[:3, :3] @ [8, 8, 8]
    p = {
        # moving: the template at 4 mm; fixed: a crop at 2 mm (different grids)
        "mov": save(data[::2, ::2, ::2], mov_affine, d / "mov.nii.gz"),
        "fix": save(data[8:-8, 8:-8, 8:-8], fix_affine, d / "fix.nii.gz"),
        "mov4d": save(data[::2, ::2, ::2, None], mov_affine, d / "mov_1frame.nii.gz"),
        "blob": save(blob(), np.diag([3.0, 3.0, 3.0, 1.0]), d / "blob.nii.gz"),
    }
    small = np.diag([3.0, 3.0, 3.0, 1.0])
    p["text_nii"] = d / "text.nii.gz"
    p["text_nii"].write_text("this is not an image\n")
    raw = p["mov"].read_bytes()
    p["trunc"] = d / "trunc.nii.gz"
    p["trunc"].write_bytes(raw[: len(raw) // 2])
    p["img2d"] = save(blob()[:, :, 20], small, d / "flat2d.nii.gz")
    p["frames3"] = save(np.stack([blob()] * 3, axis=-1), small, d / "frames3.nii.gz")
    nan = blob()
    nan[20, 20, 20] = np.nan
    p["nan"] = save(nan, small, d / "nan.nii.gz")
    inf = blob()
    inf[3, 4, 5] = np.inf
    p["inf"] = save(inf, small, d / "inf.nii.gz")
    p["const"] = save(np.full((40, 40, 40), 5.0, np.float32), small, d / "const.nii.gz")
    # weights that do not fit
    p["w_text"] = d / "weights.txt"
    p["w_text"].write_text("not weights\n")
    p["w_text_pt"] = d / "bogus.pt"
    p["w_text_pt"].write_text("not a checkpoint either\n")
    p["w_plain_h5"] = d / "plain.h5"
    with h5py.File(p["w_plain_h5"], "w") as f:
        f.create_dataset("data", data=np.arange(10))
    p["w_badarch"] = d / "badarch.h5"
    with h5py.File(p["w_badarch"], "w") as f:
        names = []
        for i in range(5):
            g = f.create_group(f"conv{i}")
            g.create_dataset(f"conv{i}/kernel:0", data=np.zeros((2, 2, 2, 1, 4), np.float32))
            g.create_dataset(f"conv{i}/bias:0", data=np.zeros(4, np.float32))
            g.attrs["weight_names"] = [f"conv{i}/kernel:0".encode(), f"conv{i}/bias:0".encode()]
            names.append(f"conv{i}".encode())
        f.attrs["layer_names"] = names
    # FreeSurfer installations: one without models, one with a (tiny) official affine file
    (d / "fs_empty" / "models").mkdir(parents=True)
    (d / "fs_tiny" / "models").mkdir(parents=True)
    detector = load_checkpoint(tiny_weights["affine"])["affine"]
    write_keras_affine(d / "fs_tiny" / "models" / "synthmorph.affine.2.h5", detector)
    p["fs_empty"], p["fs_tiny"] = d / "fs_empty", d / "fs_tiny"
    # transforms for apply
    p["identity_txt"] = d / "identity.txt"
    save_transform(p["identity_txt"], Chain([Affine(np.eye(4))]))
    p["garbage_h5"] = d / "garbage.h5"
    p["garbage_h5"].write_text("#Insight Transform File V1.0\ngarbage\n")
    p["xyz"] = d / "transform.xyz"
    p["xyz"].write_text("1 0 0 0\n")
    p["singular_txt"] = d / "singular.txt"  # flattens the third axis
    p["singular_txt"].write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: 1 0 0 0 1 0 0 0 0 0 0 0\nFixedParameters: 0 0 0\n")
    vec = np.repeat(blob()[..., None, None], 3, axis=-1)  # (X, Y, Z, 1, 3), a vector image
    p["vec5d"] = save(vec, small, d / "vector5d.nii.gz")
    return p


# --------------------------------------------------------------------------- bad input
# Each case: (inputs, weights, output dir) -> (argv, expected texts on stderr, env)
def _reg(*argv, w="affine", mode="affine", mov="mov", fix="fix", out=("-t", "fwd.lta")):
    def make(p, weights, o):
        args = ["register", "-e", "192", "-m", mode]
        if w:
            args += ["-w", weights[w] if w in weights else p[w]]
        args += list(out)  # relative to the case's directory, the working directory
        moving = p[mov] if mov in p else Path(o.parent / mov)
        fixed = p[fix] if fix in p else Path(o.parent / fix)
        return [*args, *(p.get(a, a) for a in argv), moving, fixed]
    return make


def _case(make, *expected, env=None):
    return make, expected, env


BAD_INPUT = {
    "missing_moving": _case(_reg(mov="nope.nii.gz"), "nope.nii.gz", "not found"),
    "missing_fixed": _case(_reg(fix="nope.nii.gz"), "nope.nii.gz", "not found"),
    "text_named_nii_gz": _case(_reg(mov="text_nii"), "text.nii.gz"),
    "truncated_gzip": _case(_reg(fix="trunc"), "trunc.nii.gz"),
    "image_2d": _case(_reg(mov="img2d"), "flat2d.nii.gz", "2-D"),
    "image_4d_3_frames": _case(_reg(fix="frames3"), "frames3.nii.gz", "3 frames"),
    "nan_voxels": _case(_reg(mov="nan"), "nan.nii.gz", "NaN"),
    "inf_voxels": _case(_reg(fix="inf"), "inf.nii.gz", "infinite"),
    "constant_image": _case(_reg(fix="const"), "const.nii.gz", "constant"),
    "lambda_0": _case(_reg("-r", "0", mode="joint", w="joint"), "got 0"),
    "lambda_1": _case(_reg("-r", "1", mode="joint", w="joint"), "got 1"),
    "lambda_1.5": _case(_reg("-r", "1.5", mode="joint", w="joint"), "got 1.5"),
    "lambda_abc": _case(_reg("-r", "abc", mode="joint", w="joint"), "abc"),
    "extent_100": _case(_reg("-e", "100"), "100"),
    "weights_text_file": _case(_reg(w="w_text"), "weights.txt"),
    "weights_text_named_pt": _case(_reg(w="w_text_pt"), "bogus.pt"),
    "weights_h5_not_keras": _case(_reg(w="w_plain_h5"), "plain.h5", "Keras"),
    "weights_other_architecture": _case(_reg(w="w_badarch"), "badarch.h5"),
    "weights_affine_only_for_joint": _case(_reg(mode="joint", w="affine",
                                                out=("-t", "fwd.h5")),
                                           "affine.pt", "no deformable network"),
    "weights_affine_only_for_deform": _case(_reg(mode="deform", w="affine",
                                                 out=("-t", "fwd.h5")),
                                            "affine.pt", "no deformable network"),
    # -t is fine, -o goes nowhere: found before any computation, -t is not written
    "output_dir_missing": _case(_reg(out=("-t", "fwd.lta", "-o", "nodir/moved.nii.gz")),
                                "nodir"),
    "output_is_directory": _case(_reg(out=("-t", "fwd.lta", "-O", "existing_dir")),
                                 "existing_dir", "directory"),
    "output_name_too_long": _case(_reg(out=("-t", "fwd.lta", "-o", "m" * 300 + ".nii.gz")),
                                  "mmmmmmmmmm"),
    "output_image_unknown_type": _case(_reg(out=("-t", "fwd.lta", "-o", "moved.xyz")),
                                       "moved.xyz"),
    "linear_format_for_joint": _case(_reg(mode="joint", w="joint", out=("-t", "x.txt")),
                                     "x.txt"),
    "header_only_with_joint": _case(_reg("-H", mode="joint", w="joint",
                                         out=("-o", "moved.nii.gz")), "-H"),
    "init_missing": _case(_reg("-i", "missing_init.lta", mode="deform", w="joint",
                               out=("-t", "fwd.h5")), "missing_init.lta"),
    "no_outputs": _case(_reg(out=()), "-o"),
    "steps_100": _case(_reg("-n", "100", mode="joint", w="joint", out=("-t", "fwd.h5")),
                       "0..16", "100"),
    "init_singular": _case(_reg("-i", "singular_txt", mode="affine"), "singular.txt",
                           "singular"),
    "image_5d_vector": _case(_reg(mov="vec5d"), "vector5d.nii.gz", "5-D",
                             "(40, 40, 40, 1, 3)"),
    "no_weights_without_freesurfer": _case(_reg(w=None), "-w", "FREESURFER_HOME"),
    "no_weights_empty_freesurfer": _case(_reg(w=None, mode="joint", out=("-t", "fwd.h5")),
                                         "-w", "FREESURFER_HOME", env="fs_empty"),
}


def _apply(*argv):
    def make(p, weights, o):
        return ["apply", *[p[a] if a in p else a if a.startswith("-") else o / a
                           for a in argv]]
    return make


BAD_APPLY = {
    "apply_garbage_h5": _case(_apply("garbage_h5", "mov", "out.nii.gz"), "garbage.h5"),
    "apply_unknown_suffix": _case(_apply("xyz", "mov", "out.nii.gz"), "transform.xyz"),
    "apply_missing_transform": _case(_apply("nope.lta", "mov", "out.nii.gz"), "nope.lta"),
    "apply_txt_without_reference": _case(_apply("identity_txt", "mov", "out.nii.gz"),
                                         "identity.txt", "--reference"),
    "apply_odd_pairs": _case(_apply("identity_txt", "mov", "out.nii.gz", "fix"), "pairs"),
    "apply_missing_input": _case(_apply("--reference", "fix", "identity_txt",
                                        "missing.nii.gz", "out.nii.gz"), "missing.nii.gz"),
    "apply_output_unknown_type": _case(_apply("--reference", "fix", "identity_txt", "mov",
                                              "out.xyz"), "out.xyz"),
}

ALL_BAD = {**BAD_INPUT, **BAD_APPLY}


# One case of each kind of check (argument parser, image loader, weights, outputs,
# environment, apply) also runs as a real process: importing torch costs each ~1.5 s.
IN_SUBPROCESS = ["lambda_abc", "truncated_gzip", "weights_h5_not_keras",
                 "output_is_directory", "no_weights_empty_freesurfer", "apply_odd_pairs",
                 "apply_garbage_h5"]
QUIET = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _prepare_case(name, inputs, tiny_weights, tmp_path):
    make, expected, env = ALL_BAD[name]
    out = tmp_path / "out"
    out.mkdir()
    if name == "output_is_directory":
        (out / "existing_dir").mkdir()
    argv = [str(a) for a in make(inputs, tiny_weights, out)]
    extra = {"FREESURFER_HOME": str(inputs[env])} if env else {}
    if name.startswith("no_weights"):  # hide the embedded models behind an empty site folder
        (tmp_path / "no_site").mkdir()
        extra["SYNTHMORPH_WEIGHTS_DIR"] = str(tmp_path / "no_site")
    return argv, expected, extra, out


@pytest.mark.parametrize("name", list(ALL_BAD))
def test_bad_input_one_line_no_output(name, inputs, tiny_weights, tmp_path, capfd):
    """In-process: anything escaping main() fails the test; stderr is read at the file
    descriptor, and warnings a terminal would show count as stderr lines."""
    argv, expected, extra, out = _prepare_case(name, inputs, tiny_weights, tmp_path)
    before = listing(out)
    capfd.readouterr()
    with working_dir(out), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = run_main(argv, **extra)
        except SystemExit as stop:  # argument errors
            code = stop.code
    stdout, stderr = capfd.readouterr()
    stderr += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught
                      if not issubclass(w.category, QUIET))
    assert_one_line_error(subprocess.CompletedProcess(argv, code, stdout, stderr), *expected)
    assert listing(out) == before, "an output or temporary file was left behind"


@pytest.mark.parametrize("name", IN_SUBPROCESS)
def test_bad_input_in_subprocess(name, inputs, tiny_weights, tmp_path):
    argv, expected, extra, out = _prepare_case(name, inputs, tiny_weights, tmp_path)
    before = listing(out)
    result = subprocess.run([*CLI, *argv], cwd=out, env=clean_env(**extra),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert_one_line_error(result, *expected)
    assert listing(out) == before, "an output or temporary file was left behind"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write into read-only directories")
def test_read_only_output_directory(inputs, tiny_weights, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = subprocess.run(
            [*CLI, "register", "-m", "affine", "-e", "192", "-w", str(tiny_weights["affine"]),
             "-t", str(ro / "fwd.lta"), str(inputs["mov"]), str(inputs["fix"])],
            env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
        assert_one_line_error(result, "fwd.lta", "permission denied")
        assert listing(ro) == []
    finally:
        ro.chmod(0o755)


def test_no_weights_via_console_script(inputs, tmp_path):
    exe = shutil.which("synthmorph")
    if exe is None:
        pytest.skip("the synthmorph console script is not on PATH")
    empty = tmp_path / "no_weights"
    empty.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([exe, "register", "-e", "192", "-t", str(out / "fwd.h5"),
                             str(inputs["mov"]), str(inputs["fix"])],
                            env=clean_env(SYNTHMORPH_WEIGHTS_DIR=str(empty)),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert_one_line_error(result, "no SynthMorph weights", "-w", "FREESURFER_HOME")
    assert listing(out) == []


def test_version_and_help():
    version = subprocess.run([*CLI, "--version"], capture_output=True, text=True,
                             timeout=TIMEOUT)
    assert version.returncode == 0 and version.stdout.startswith("synthmorph ")
    for sub, flag in (("register", "--weights"), ("apply", "--reference")):
        helped = subprocess.run([*CLI, sub, "--help"], capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert helped.returncode == 0, helped.stderr
        assert "usage:" in helped.stdout and flag in helped.stdout and helped.stderr == ""
    exe = shutil.which("synthmorph")
    if exe:
        assert subprocess.run([exe, "--version"], capture_output=True,
                              timeout=TIMEOUT).returncode == 0


def test_failure_while_committing_leaves_nothing(inputs, tiny_weights, tmp_path):
    """The -O path turns into a directory while the outputs are being written (after
    the checks and the computation): the already written -t and -o must not remain."""
    out = tmp_path / "late"
    out.mkdir()
    late = out / "fixed_moved.nii.gz"
    proc = subprocess.Popen(
        [*CLI, "register", "-m", "affine", "-e", "192", "-w", str(tiny_weights["affine"]),
         "-t", str(out / "fwd.lta"), "-o", str(out / "moved.nii.gz"), "-O", str(late),
         str(inputs["mov"]), str(inputs["fix"])],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        seen = False  # the first temporary output: the checks and the computation are done
        while not seen and proc.poll() is None and time.monotonic() < deadline:
            seen = any(name.startswith(".") for name in os.listdir(out))
            time.sleep(0.002)
        late.mkdir()
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert seen, f"no temporary output appeared; stderr: {stderr!r}"
    assert_one_line_error(result, "fixed_moved.nii.gz")
    assert listing(out) == ["fixed_moved.nii.gz"], "outputs left after a failed commit"


# --------------------------------------------------------------------------- success
def check_image(path: Path, shape, affine) -> np.ndarray:
    img = nb.load(str(path))
    assert img.shape == tuple(shape)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    data = np.asanyarray(img.dataobj)
    assert np.all(np.isfinite(data)) and np.ptp(data) > 0
    return data


@pytest.fixture(scope="module")
def grids(inputs):
    mov, fix = nb.load(str(inputs["mov"])), nb.load(str(inputs["fix"]))
    return {"mov": (mov.shape, mov.affine), "fix": (fix.shape, fix.affine)}


AFFINE_OUTPUTS = ["-o", "moved.nii.gz", "-O", "fixed_moved.nii.gz", "-t", "fwd.lta",
                  "-T", "inv.txt"]


@pytest.fixture(scope="module")
def affine_runs(inputs, tiny_weights, tmp_path_factory) -> tuple[Path, Path]:
    """The same affine command run twice, in two directories (relative output names)."""
    dirs = tmp_path_factory.mktemp("affine1"), tmp_path_factory.mktemp("affine2")
    argv = ["register", "-m", "affine", "-e", "192", "-w", tiny_weights["affine"],
            *AFFINE_OUTPUTS, inputs["mov"], inputs["fix"]]
    for d in dirs:
        with working_dir(d):
            assert run_main(argv) == 0
    return dirs


def test_affine_outputs(affine_runs, grids):
    d = affine_runs[0]
    assert listing(d) == ["fixed_moved.nii.gz", "fwd.lta", "inv.txt", "moved.nii.gz"]
    check_image(d / "moved.nii.gz", *grids["fix"])
    check_image(d / "fixed_moved.nii.gz", *grids["mov"])
    fwd = load_transform(d / "fwd.lta")
    assert fwd.reference is not None and fwd.reference.shape == grids["fix"][0]
    np.testing.assert_allclose(fwd.reference.affine, grids["fix"][1], atol=1e-4)
    np.testing.assert_allclose(load_matrix(d / "fwd.lta") @ load_matrix(d / "inv.txt"),
                               np.eye(4), atol=1e-3)


def test_same_command_twice_gives_identical_outputs(affine_runs):
    first, second = affine_runs
    assert listing(first) == listing(second)
    for name in ("fwd.lta", "inv.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for name in ("moved.nii.gz", "fixed_moved.nii.gz"):
        a, b = nb.load(str(first / name)), nb.load(str(second / name))
        np.testing.assert_array_equal(a.affine, b.affine)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def test_apply_reproduces_register_output(affine_runs, inputs, tmp_path):
    d = affine_runs[0]
    out = tmp_path / "applied.nii.gz"
    assert run_main(["apply", d / "fwd.lta", inputs["mov"], out]) == 0
    expected = nb.load(str(d / "moved.nii.gz"))
    got = nb.load(str(out))
    np.testing.assert_allclose(got.affine, expected.affine, atol=1e-4)
    np.testing.assert_allclose(got.get_fdata(), expected.get_fdata(), atol=1e-3)


def test_rigid_header_only_single_thread(inputs, tiny_weights, tmp_path, grids):
    argv = ["register", "-m", "rigid", "-e", "192", "-j", "1", "-H",
            "-w", tiny_weights["affine"], "-o", tmp_path / "moved.nii.gz",
            "-t", tmp_path / "fwd.mat", "-T", tmp_path / "inv.lta",
            inputs["mov"], inputs["fix"]]
    assert run_main(argv) == 0
    assert listing(tmp_path) == ["fwd.mat", "inv.lta", "moved.nii.gz"]
    fwd = load_matrix(tmp_path / "fwd.mat")
    rot = fwd[:3, :3]
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-4)
    np.testing.assert_allclose(fwd @ load_matrix(tmp_path / "inv.lta"), np.eye(4), atol=1e-3)
    # header only: the moving voxels on the moving grid, with a new voxel-to-world matrix
    shape, mov_affine = grids["mov"]
    moved = check_image(tmp_path / "moved.nii.gz", shape, np.linalg.inv(fwd) @ mov_affine)
    np.testing.assert_array_equal(moved, np.asanyarray(nb.load(str(inputs["mov"])).dataobj))


def check_field_chain(path: Path, grid_shape, grid_affine) -> Chain:
    loaded = load_transform(path)
    fields = [t for t in loaded.chain if isinstance(t, DisplacementField)]
    assert fields, f"{path} holds no displacement field"
    assert loaded.reference is not None and loaded.reference.shape == tuple(grid_shape)
    np.testing.assert_allclose(loaded.reference.affine, grid_affine, atol=1e-4)
    for f in fields:
        assert np.all(np.isfinite(np.asarray(f.field)))
    return loaded.chain


def test_deform_with_init_from_affine_lta(affine_runs, inputs, tiny_weights, tmp_path,
                                          grids):
    init = affine_runs[0] / "fwd.lta"
    argv = ["register", "-m", "deform", "-e", "192", "-w", tiny_weights["joint"],
            "-i", init, "-o", tmp_path / "moved.nii.gz", "-O", tmp_path / "fixed_moved.nii.gz",
            "-t", tmp_path / "fwd.h5", "-T", tmp_path / "inv.nii.gz",
            inputs["mov"], inputs["fix"]]
    assert run_main(argv) == 0
    assert listing(tmp_path) == ["fixed_moved.nii.gz", "fwd.h5", "inv.nii.gz",
                                 "moved.nii.gz"]
    check_image(tmp_path / "moved.nii.gz", *grids["fix"])
    check_image(tmp_path / "fixed_moved.nii.gz", *grids["mov"])
    chain = check_field_chain(tmp_path / "fwd.h5", *grids["fix"])
    check_field_chain(tmp_path / "inv.nii.gz", *grids["mov"])
    # in deform mode the affine part of the result is the initial transform
    linear = [t for t in chain if isinstance(t, Affine)]
    assert len(linear) == 1
    np.testing.assert_allclose(linear[0].matrix, load_matrix(init), atol=1e-4)


def test_joint_with_init_and_zero_steps(affine_runs, inputs, tiny_weights, tmp_path, grids):
    argv = ["register", "-e", "192", "-n", "0", "-w", tiny_weights["joint"],
            "-i", affine_runs[0] / "fwd.lta", "-o", tmp_path / "moved.nii.gz",
            "-t", tmp_path / "fwd.h5", "-T", tmp_path / "inv.h5",
            inputs["mov"], inputs["fix"]]
    assert run_main(argv) == 0  # -m joint is the default
    assert listing(tmp_path) == ["fwd.h5", "inv.h5", "moved.nii.gz"]
    check_image(tmp_path / "moved.nii.gz", *grids["fix"])
    check_field_chain(tmp_path / "fwd.h5", *grids["fix"])
    check_field_chain(tmp_path / "inv.h5", *grids["mov"])


def test_official_weights_from_freesurfer_home_and_single_frame_4d(
        affine_runs, inputs, tmp_path, grids):
    """No -w: $FREESURFER_HOME/models/synthmorph.affine.2.h5 (the tiny detector in Keras
    layout) is used; the moving image is 4-D with one frame. Same weights and voxels as
    the -w run, so the same transform."""
    argv = ["register", "-m", "affine", "-e", "192", "-t", tmp_path / "fwd.lta",
            "-o", tmp_path / "moved.nii.gz", inputs["mov4d"], inputs["fix"]]
    assert nb.load(str(inputs["mov4d"])).shape == (*grids["mov"][0], 1)
    assert run_main(argv, FREESURFER_HOME=str(inputs["fs_tiny"])) == 0
    assert listing(tmp_path) == ["fwd.lta", "moved.nii.gz"]
    check_image(tmp_path / "moved.nii.gz", *grids["fix"])
    np.testing.assert_allclose(load_matrix(tmp_path / "fwd.lta"),
                               load_matrix(affine_runs[0] / "fwd.lta"), atol=1e-5)


# --------------------------------------------------------------------------- apply
def test_apply_fill_outside_field_of_view(inputs, tmp_path, grids):
    shift = np.eye(4)
    shift[0, 3] = 60.0  # pull-back: fixed point p samples the moving image at p + 60 mm
    transform = tmp_path / "shift.txt"
    save_transform(transform, Chain([Affine(shift)]))
    out = tmp_path / "out.nii.gz"
    assert run_main(["apply", "-f", "7", "--reference", inputs["fix"], transform,
                     inputs["mov"], out]) == 0
    data = check_image(out, *grids["fix"])
    fix_shape, fix_affine = grids["fix"]
    mov_shape, mov_affine = grids["mov"]
    ijk = np.indices(fix_shape).reshape(3, -1).T
    world = ijk @ fix_affine[:3, :3].T + fix_affine[:3, 3] + shift[:3, 3]
    idx = (world - mov_affine[:3, 3]) @ np.linalg.inv(mov_affine[:3, :3]).T
    hi = np.asarray(mov_shape) - 1
    outside = ((idx < -0.01) | (idx > hi + 0.01)).any(1).reshape(fix_shape)
    inside = ((idx > 0.01) & (idx < hi - 0.01)).all(1).reshape(fix_shape)
    assert outside.sum() > 1000 and inside.sum() > 1000
    assert np.all(data[outside] == 7)
    assert np.mean(data[inside] == 7) < 0.01


def test_apply_output_dtype_and_long_name(inputs, tmp_path):
    values = (np.indices((30, 31, 32)).sum(0) * 4).astype(np.float32)  # 0 .. 360
    src = save(values, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "ramp.nii.gz")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / ("r" * 240 + ".nii.gz")  # valid name; its temporary twin must be too
    assert run_main(["apply", "-t", "uint8", "--reference", src, inputs["identity_txt"],
                     src, out]) == 0
    assert listing(out_dir) == [out.name]
    img = nb.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.clip(values, 0, 255))


def test_apply_nearest_keeps_labels(inputs, tmp_path):
    labels = np.zeros((20, 20, 20), np.int16)
    labels[5:15, 5:15, 5:15] = 3
    labels[8:12, 8:12, 8:12] = 41
    src = save(labels, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "labels.nii.gz")
    shift = np.eye(4)
    shift[:3, 3] = [1.3, -0.7, 2.1]
    transform = tmp_path / "shift.txt"
    save_transform(transform, Chain([Affine(shift)]))
    out = tmp_path / "out.nii.gz"
    assert run_main(["apply", "-m", "nearest", "--reference", src, transform, src, out]) == 0
    data = np.asanyarray(nb.load(str(out)).dataobj)
    assert data.dtype == np.int16
    assert set(np.unique(data)) == {0, 3, 41}


# --------------------------------------------------------------------------- review fixes
def test_apply_nearest_unsigned_and_mgz_types(inputs, tmp_path):
    """uint16 labels through nearest keep their values; MGZ gets a type it can hold."""
    labels = (blob() * 3).astype(np.uint16) * 1000
    src = save(labels, np.diag([3.0, 3.0, 3.0, 1.0]), tmp_path / "labels.nii.gz")
    assert run_main(["apply", "-m", "nearest", "--reference", src, inputs["identity_txt"],
                     src, tmp_path / "out.nii.gz", src, tmp_path / "out.mgz"]) == 0
    out = nb.load(str(tmp_path / "out.nii.gz"))
    assert out.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asarray(out.dataobj), labels)
    mgz = nb.load(str(tmp_path / "out.mgz"))
    assert mgz.get_data_dtype().newbyteorder("=") == np.int32  # MGH has no uint16
    np.testing.assert_array_equal(np.asarray(mgz.dataobj), labels)


def test_apply_fill_must_fit_the_output_type(inputs, tmp_path, capfd):
    labels = save((blob() * 3).astype(np.uint8), np.diag([3.0, 3.0, 3.0, 1.0]),
                  tmp_path / "labels.nii.gz")
    argv = ["apply", "-m", "nearest", "-f", "-1", "--reference", labels,
            inputs["identity_txt"], labels, tmp_path / "out.nii.gz"]
    assert run_main(argv) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fill value -1" in err[0] and "uint8" in err[0]
    assert not (tmp_path / "out.nii.gz").exists()


def test_upper_case_suffixes(inputs, tiny_weights, tmp_path):
    assert run_main(["register", "-m", "affine", "-e", "192", "-j", "1", "-w",
                     tiny_weights["affine"], "-t", tmp_path / "FWD.TXT", "-o",
                     tmp_path / "MOVED.NII.GZ", inputs["mov"], inputs["fix"]]) == 0
    assert listing(tmp_path) == ["FWD.TXT", "MOVED.NII.GZ"]
    assert nb.load(str(tmp_path / "MOVED.NII.GZ")).shape == nb.load(str(inputs["fix"])).shape
    assert load_transform(tmp_path / "FWD.TXT").chain.as_affine() is not None


def test_sheared_grid_refused_before_registering(inputs, tiny_weights, tmp_path, capfd):
    img = nb.load(str(inputs["fix"]))
    sheared = img.affine.copy()
    sheared[0, 1] = 0.4
    fix = save(np.asarray(img.dataobj), sheared, tmp_path / "sheared.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["register", "-m", "joint", "-e", "192", "-w", tiny_weights["joint"],
            "-t", out / "fw.h5", inputs["mov"], fix]
    start = time.perf_counter()
    assert run_main(argv) == 1
    assert time.perf_counter() - start < 5  # refused before the networks run
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fw.h5" in err[0] and "sheared" in err[0]
    assert listing(out) == []


def test_non_affine_init_named(inputs, tiny_weights, tmp_path, capfd):
    grid = nb.load(str(inputs["fix"]))
    from synthmorph_nipype.transforms.base import ImageGrid

    field = DisplacementField(ImageGrid.from_image(grid),
                              np.zeros((*grid.shape, 3), np.float32))
    save_transform(tmp_path / "init.nii.gz", field)
    assert run_main(["register", "-m", "affine", "-e", "192", "-w", tiny_weights["affine"],
                     "-i", tmp_path / "init.nii.gz", "-t", tmp_path / "fw.lta",
                     inputs["mov"], inputs["fix"]]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init.nii.gz" in err[0] and "affine" in err[0]


def test_cpu_flag_and_device_choice():
    from synthmorph_nipype.engine.device import pick_device

    assert pick_device(False).type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device(None).type == "cpu"
        with pytest.raises(Exception, match="CUDA is not available"):
            pick_device(True)
    with pytest.raises(SystemExit):  # -g and --cpu exclude each other
        main(["register", "-g", "--cpu", "-t", "x.lta", "a.nii", "b.nii"])


def test_bare_affine_works_in_the_api(inputs):
    from synthmorph_nipype.engine.resample import header_only

    img = nb.load(str(inputs["mov"]))
    shift = np.eye(4)
    shift[:3, 3] = [5.0, -3.0, 2.0]
    moved = header_only(img, Affine(shift))
    np.testing.assert_allclose(moved.affine, np.linalg.inv(shift) @ img.affine)


# --------------------------------------------------------------------------- inputs are sacred
@pytest.mark.parametrize("flag, target, link", [
    ("-o", "mov", "same"), ("-O", "fix", "same"), ("-t", "mov", "same"),
    ("-T", "fix", "symlink"), ("--out-lambda", "mov", "hardlink"), ("-o", "fix", "dotted"),
    ("-t", "weights", "same")])
def test_register_refuses_outputs_onto_its_inputs(inputs, tiny_weights, tmp_path, capfd,
                                                  flag, target, link):
    """An output that is an input (by its name, another spelling, a symlink or a hard
    link) is refused before any work, and the input is left as it was."""
    work = tmp_path / "work"
    work.mkdir()
    mov, fix = shutil.copy(inputs["mov"], work), shutil.copy(inputs["fix"], work)
    weights = Path(shutil.copy(tiny_weights["joint"], work))
    files = {"mov": Path(mov), "fix": Path(fix), "weights": weights}
    victim = files[target]
    before = victim.read_bytes()
    out = {"same": victim, "dotted": work / "." / victim.name,
           "symlink": work / "link.nii.gz", "hardlink": work / "hard.nii.gz"}[link]
    if link == "symlink":
        out.symlink_to(victim)
    elif link == "hardlink":
        os.link(victim, out)
    mode = ["-m", "affine"] if flag in ("-o", "-O") else []
    code = run_main(["register", *mode, "-e", "192", "-w", weights, flag, out, mov, fix])
    err = capfd.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and f"{flag} would overwrite" in err, err
    assert victim.read_bytes() == before
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary files


def test_register_refuses_two_outputs_with_one_name(inputs, tiny_weights, tmp_path, capfd):
    out = tmp_path / "x.h5"
    code = run_main(["register", "-e", "192", "-w", tiny_weights["joint"], "-t", out,
                     "-T", tmp_path / "." / "x.h5", inputs["mov"], inputs["fix"]])
    assert code != 0
    assert "-T and -t name the same file" in capfd.readouterr().err
    assert not out.exists()


def test_apply_refuses_outputs_onto_its_inputs(affine_runs, inputs, tmp_path, capfd):
    fwd = Path(shutil.copy(affine_runs[0] / "fwd.lta", tmp_path))
    img = Path(shutil.copy(inputs["mov"], tmp_path))
    other = Path(shutil.copy(inputs["fix"], tmp_path))
    before = {p: p.read_bytes() for p in (fwd, img, other)}
    for argv, expected in (
            ([fwd, img, img], "OUTPUT 1 would overwrite INPUT 1"),
            ([fwd, img, tmp_path / "ok.nii.gz", other, img], "OUTPUT 2 would overwrite INPUT 1"),
            ([fwd, img, fwd.with_suffix(".lta")], "OUTPUT 1 would overwrite TRANSFORM"),
            (["--reference", other, fwd, img, other], "OUTPUT 1 would overwrite --reference"),
            ([fwd, img, tmp_path / "a.nii.gz", other, tmp_path / "a.nii.gz"],
             "OUTPUT 2 and OUTPUT 1 name the same file")):
        assert run_main(["apply", *argv]) != 0
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in before)


def test_apply_warns_when_values_do_not_fit_the_type(inputs, tmp_path, capfd):
    """``apply -t uint8`` on data beyond 255 clips, and says so in one line."""
    img = nb.load(str(inputs["mov"]))
    data = np.asarray(img.dataobj, dtype=np.float32)
    big = save(data / data.max() * 4080, img.affine, tmp_path / "big.nii.gz")
    out = tmp_path / "u8.nii.gz"
    assert run_main(["apply", "-t", "uint8", inputs["identity_txt"], big, out,
                     "--reference", big]) == 0
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "do not fit uint8 (0 to 255): clipped" in err, err
    assert np.asarray(nb.load(str(out)).dataobj).max() == 255
    assert run_main(["apply", "-t", "uint16", inputs["identity_txt"], big,
                     tmp_path / "u16.nii.gz", "--reference", big]) == 0
    assert "warning" not in capfd.readouterr().err


def test_near_empty_and_tiny_images_are_warned_about(inputs, tiny_weights, tmp_path, capfd):
    one = np.zeros((40, 40, 40), np.float32)
    one[20, 20, 20] = 1.0
    empty = save(one, np.diag([3.0, 3.0, 3.0, 1.0]), tmp_path / "one_voxel.nii.gz")
    crop = save(blob(8), np.eye(4), tmp_path / "crop8.nii.gz")
    for moving, expected in ((empty, "only 1 non-zero voxels"),
                             (crop, "field of view 8 x 8 x 8 mm")):
        assert run_main(["register", "-m", "affine", "-e", "192", "-w", tiny_weights["affine"],
                         "-t", tmp_path / "x.lta", moving, inputs["fix"]]) == 0
        err = capfd.readouterr().err
        assert f"{moving.name}: {expected}" in err and "warning" in err, err
    assert run_main(["register", "-m", "affine", "-e", "192", "-w", tiny_weights["affine"],
                     "-t", tmp_path / "y.lta", inputs["mov"], inputs["fix"]]) == 0
    assert "warning" not in capfd.readouterr().err


@pytest.mark.parametrize("sig, code, word", [("SIGTERM", 143, "terminated"),
                                             ("SIGINT", 130, "interrupted")])
def test_signals_end_with_one_line_and_no_temporary_files(inputs, tmp_path, sig, code, word):
    """A signal while the command runs: one line, the shell's exit code, and no output or
    temporary file left (signalled once the process has started working)."""
    import signal as signals

    out = tmp_path / "out"
    out.mkdir()
    script = ("import time, synthmorph_nipype.cli.commands as c, sys\n"
              "from synthmorph_nipype.cli.main import main\n"
              "real = c.save_image\n"
              "def slow(img, path):\n"
              "    real(img, path); print('writing', flush=True); time.sleep(60)\n"
              "c.save_image = slow\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "apply", inputs["identity_txt"], inputs["mov"],
         out / "a.nii.gz", "--reference", inputs["fix"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    assert proc.stdout.readline().strip() == "writing"  # the temporary file is on disk
    assert [p.name for p in out.iterdir()][0].startswith(".")
    proc.send_signal(getattr(signals, sig))
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == code
    assert err.strip().count("\n") == 0 and word in err and sig in err, err
    assert listing(out) == []
