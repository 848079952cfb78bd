"""What Nipype adds and what it buys: per-node overhead, MultiProc speed-up, SLURM.

On the demo pair (the 1 mm template and an oblique, anisotropic, re-contrasted copy), with
models of the embedded size (random weights: time does not depend on the values):

* overhead: one ``init_synthmorph_wf`` registration node run by the Linear plugin, against
  the bare ``synthmorph register`` command on the same pair (median of ``--runs``);
* speed-up: four registrations (copies of the moving image), Linear against MultiProc
  with 2 processes, one thread per registration; and, as the machine's ceiling, the same
  command lines by hand, one after the other against two at a time;
* SLURM: the same four through the SLURM plugin, when ``sbatch`` is present (start the
  one-node cluster with ``scripts/slurm_cluster.sh``).

Every run starts from an empty work directory, so nothing is cached. Stop other work on
the machine first: the figures are ratios between runs of this script only.

    python benchmarks/nipype_execution.py --mode joint --extent 192 --runs 3 \
        --json benchmarks/results/nipype_execution.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from synthmorph_nipype.cli.demo import make_pair
from synthmorph_nipype.interfaces import SynthMorphRegister
from synthmorph_nipype.models import AffineDetector, HyperUNet
from synthmorph_nipype.models.checkpoint import save_checkpoint
from synthmorph_nipype.training.config import TrainConfig
from synthmorph_nipype.workflows import init_synthmorph_wf


def embedded_size_weights(path: Path) -> Path:
    torch.manual_seed(0)
    affine = AffineDetector(TrainConfig(model="affine").model_config())
    deform = HyperUNet(TrainConfig(model="joint").model_config())
    save_checkpoint(path, affine=affine, deform=deform)
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def workflow(mode, extent, weights, fixed, movings, base, threads=1):
    wf = init_synthmorph_wf(mode=mode, extent=extent, weights=[str(weights)],
                            omp_nthreads=threads)
    wf.base_dir = str(base)
    node = wf.get_node("inputnode")
    node.inputs.fixed_image = str(fixed)
    if len(movings) == 1:
        node.inputs.moving_image = str(movings[0])
    else:
        node.iterables = ("moving_image", [str(m) for m in movings])
    return wf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="joint", choices=("joint", "affine"))
    parser.add_argument("--extent", type=int, default=192, choices=(192, 256))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("LOGNAME", os.environ.get("USER", "root"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        moving, fixed, _ = make_pair(tmp)
        weights = embedded_size_weights(tmp / "weights.pt")
        movings = []
        for k in range(4):
            movings.append(tmp / f"moving_{k}.nii.gz")
            shutil.copy(moving, movings[-1])
        out: dict = {"mode": args.mode, "extent": args.extent, "runs": args.runs,
                     "threads_per_registration": 1, "cores": os.cpu_count()}

        # in joint mode the workflow runs two nodes (affine, then deform from it): the
        # bare-CLI peer runs the same two command lines
        modes = ["affine", "deform"] if args.mode == "joint" else [args.mode]

        def bare(work: Path, moving: Path = movings[0]):
            # the very command lines the workflow's nodes run (same outputs), by hand
            work.mkdir()
            init = None
            for m in modes:
                reg = SynthMorphRegister(moving_image=str(moving), fixed_image=str(fixed),
                                         mode=m, extent=args.extent, weights=[str(weights)],
                                         write_moved=m != "affine" or len(modes) == 1)
                if init:
                    reg.inputs.init_transform = init
                subprocess.run(reg.cmdline, shell=True, check=True, cwd=work,
                               stdout=subprocess.DEVNULL)
                init = str(work / "fwd_xfm.txt")

        def nipype_one(work: Path):
            workflow(args.mode, args.extent, weights, fixed, movings[:1], work).run()

        cli, wf1 = [], []
        for r in range(args.runs):
            cli.append(timed(lambda r=r: bare(tmp / f"bare_{r}")))
            wf1.append(timed(lambda r=r: nipype_one(tmp / f"one_{r}")))
        out["bare_cli_s"], out["nipype_linear_s"] = cli, wf1
        med_cli, med_wf = statistics.median(cli), statistics.median(wf1)
        out["overhead_s"] = med_wf - med_cli
        print(f"one registration: bare CLI {med_cli:.1f} s, Nipype Linear {med_wf:.1f} s "
              f"(overhead {med_wf - med_cli:+.1f} s for {len(modes)} node(s))", flush=True)

        # the machine's own ceiling: the same four by hand, one after the other and two at
        # a time (on a VM, two "cores" rarely give twice the speed)
        serial, pair = [], []
        for r in range(args.runs):
            serial.append(timed(lambda r=r: [bare(tmp / f"ser_{r}_{k}", m)
                                             for k, m in enumerate(movings)]))
            with ThreadPoolExecutor(2) as pool:
                pair.append(timed(lambda r=r: list(pool.map(
                    lambda km: bare(tmp / f"par_{r}_{km[0]}", km[1]), enumerate(movings)))))
        out["bare_serial_4_s"], out["bare_two_at_a_time_4_s"] = serial, pair
        out["bare_speedup"] = statistics.median(serial) / statistics.median(pair)
        print(f"four registrations by hand: serial {statistics.median(serial):.1f} s, two at "
              f"a time {statistics.median(pair):.1f} s, speed-up {out['bare_speedup']:.2f}x",
              flush=True)

        lin, mp = [], []
        for r in range(args.runs):
            lin.append(timed(lambda r=r: workflow(args.mode, args.extent, weights, fixed,
                                                  movings, tmp / f"lin_{r}").run()))
            mp.append(timed(lambda r=r: workflow(args.mode, args.extent, weights, fixed,
                                                 movings, tmp / f"mp_{r}").run(
                plugin="MultiProc", plugin_args={"n_procs": 2})))
        out["linear_4_s"], out["multiproc2_4_s"] = lin, mp
        out["multiproc_speedup"] = statistics.median(lin) / statistics.median(mp)
        print(f"four registrations: Linear {statistics.median(lin):.1f} s, MultiProc(2) "
              f"{statistics.median(mp):.1f} s, speed-up {out['multiproc_speedup']:.2f}x",
              flush=True)

        if shutil.which("sbatch"):
            sl = [timed(lambda r=r: workflow(args.mode, args.extent, weights, fixed, movings,
                                             tmp / f"slurm_{r}").run(
                plugin="SLURM", plugin_args={"sbatch_args": "--cpus-per-task=1",
                                             "poll_sleep_duration": 1}))
                  for r in range(args.runs)]
            out["slurm_4_s"] = sl
            print(f"four registrations through SLURM: {statistics.median(sl):.1f} s",
                  flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
