"""Read SynthMorph weights saved by Keras (``model.save_weights`` HDF5 files).

Keras stores one group per layer (root attribute ``layer_names``), each with the
attribute ``weight_names`` giving its arrays in load order; nested models store all
their arrays under one group. Loading goes by the order of the arrays, never by layer
names, which carry arbitrary global counters. Widths are inferred from the array shapes,
so the official FreeSurfer files and smaller models of the same classes both load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import WeightsError
from .affine import AffineConfig, AffineDetector
from .joint import HyperUNet, UNet, UNetConfig
from .layers import HyperConv3d, hyper_conv_weights

LEVELS = 4  # encoder levels of both official networks


@dataclass
class KerasLayer:
    """One weighted layer: its kind (``conv``, ``dense`` or ``hyperconv``) and arrays."""

    kind: str
    name: str
    arrays: list = field(default_factory=list)  # h5py datasets (read lazily)

    def shape(self, i: int = 0) -> tuple[int, ...]:
        return tuple(self.arrays[i].shape)


def _decode(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read_layers(f: h5py.File, path: str) -> list[KerasLayer]:
    """Weighted layers of an open Keras weights file, in load order."""
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
        raise WeightsError(f"{path}: not a Keras weights file (no 'layer_names' attribute)")
    layers: list[KerasLayer] = []
    for group_name in (_decode(n) for n in root.attrs["layer_names"]):
        if group_name not in root:
            raise WeightsError(f"{path}: layer '{group_name}' is listed but has no group")
        group = root[group_name]
        for wname in (_decode(n) for n in group.attrs.get("weight_names", [])):
            layer_name, array_name = wname.rsplit("/", 1)
            if not layers or layers[-1].name != layer_name:
                kind = ("hyperconv" if array_name.startswith("hyper")
                        else "conv" if group[wname].ndim == 5 else "dense")
                layers.append(KerasLayer(kind, layer_name))
            layers[-1].arrays.append(group[wname])
    return layers


def _split(layers: list[KerasLayer], path: str):
    convs = [x for x in layers if x.kind == "conv"]
    dense = [x for x in layers if x.kind == "dense"]
    hyper = [x for x in layers if x.kind == "hyperconv"]
    for layer in layers:
        expected = 4 if layer.kind == "hyperconv" else 2
        if len(layer.arrays) != expected:
            raise WeightsError(f"{path}: layer '{layer.name}' has {len(layer.arrays)} arrays, "
                               f"expected {expected}")
    return convs, dense, hyper


def _check_chain(path: str, names: list[str], got: list[tuple], want: list[tuple]) -> None:
    for name, g, w in zip(names, got, want, strict=False):
        if tuple(g) != tuple(w):
            raise WeightsError(f"{path}: layer '{name}' has (in, out) channels {tuple(g)}, "
                               f"the architecture expects {tuple(w)}")
    if len(got) != len(want):
        raise WeightsError(f"{path}: {len(got)} layers where the architecture has {len(want)}")


def affine_from_layers(convs: list[KerasLayer], path: str, rigid: bool) -> AffineDetector:
    """Build the feature detector from its convolution layers."""
    if len(convs) < LEVELS + 1:
        raise WeightsError(f"{path}: {len(convs)} convolutions, too few for the affine "
                           f"feature detector (at least {LEVELS + 1})")
    for layer in convs:
        k = layer.shape(0)
        if k[:3] != (3, 3, 3) or layer.shape(1) != (k[4],):
            raise WeightsError(f"{path}: layer '{layer.name}' has kernel {k}, "
                               "expected (3, 3, 3, in, out) with a matching bias")
    couts = [layer.shape(0)[4] for layer in convs]
    config = AffineConfig(num_feat=couts[-1], enc_nf=tuple(couts[:LEVELS]), dec_nf=(),
                          add_nf=tuple(couts[LEVELS:-1]), num_chan=convs[0].shape(0)[3],
                          rigid=rigid)
    model = AffineDetector(config)
    torch_convs = [*model.enc, *model.add, model.out]
    want = [(c.in_channels, c.out_channels) for c in torch_convs]
    got = [layer.shape(0)[3:] for layer in convs]
    _check_chain(path, [x.name for x in convs], got, want)
    with torch.no_grad():
        for conv, layer in zip(torch_convs, convs, strict=True):
            kernel = np.asarray(layer.arrays[0][()], dtype=np.float32)
            conv.weight.copy_(torch.from_numpy(kernel.transpose(4, 3, 0, 1, 2).copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(layer.arrays[1][()], np.float32)))
    return model.eval()


def _unet_config(dense: list[KerasLayer], hyper: list[KerasLayer], path: str) -> UNetConfig:
    if len(hyper) < 2 * LEVELS + 1:
        raise WeightsError(f"{path}: {len(hyper)} hyper-convolutions, too few for the "
                           f"deformable network (at least {2 * LEVELS + 1})")
    chans = []
    for layer in hyper:
        cout = layer.shape(3)[0]
        size = layer.shape(0)[1]
        if size % (27 * cout):
            raise WeightsError(f"{path}: layer '{layer.name}' predicts {size} kernel values, "
                               f"not a multiple of 27 x {cout} outputs")
        chans.append((size // (27 * cout), cout))
    couts = [c for _, c in chans]
    try:
        config = UNetConfig(hyp_units=tuple(x.shape(0)[1] for x in dense),
                            enc_nf=tuple(couts[:LEVELS]), dec_nf=tuple(couts[LEVELS:2 * LEVELS]),
                            add_nf=tuple(couts[2 * LEVELS:-1]), num_chan=chans[0][0] // 2)
    except ValueError as err:
        raise WeightsError(f"{path}: {err}") from None
    _check_chain(path, [x.name for x in hyper], chans, config.layer_channels())
    if couts[-1] != 3:
        raise WeightsError(f"{path}: layer '{hyper[-1].name}' has {couts[-1]} outputs, "
                           "the velocity field needs 3")
    prev = 1
    for layer in dense:
        if layer.shape(0)[0] != prev:
            raise WeightsError(f"{path}: layer '{layer.name}' has kernel {layer.shape(0)}, "
                               f"the hypernetwork expects {prev} inputs")
        prev = layer.shape(0)[1]
    if hyper[0].shape(0)[0] != prev:
        raise WeightsError(f"{path}: layer '{hyper[0].name}' takes {hyper[0].shape(0)[0]} "
                           f"hyper-features, the hypernetwork gives {prev}")
    return config


def _copy_linear(linear: torch.nn.Linear, kernel, bias) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(kernel[()], np.float32).T.copy()))
        linear.bias.copy_(torch.from_numpy(np.asarray(bias[()], np.float32)))


def _copy_hyper(conv: HyperConv3d, layer: KerasLayer) -> None:
    _copy_linear(conv.hyperkernel, layer.arrays[0], layer.arrays[1])
    _copy_linear(conv.hyperbias, layer.arrays[2], layer.arrays[3])


def hyper_unet_from_layers(dense, hyper, path: str) -> HyperUNet:
    """The full hypernetwork model (for training or several lambdas)."""
    model = HyperUNet(_unet_config(dense, hyper, path))
    for linear, layer in zip(model.hyper, dense, strict=True):
        _copy_linear(linear, *layer.arrays)
    for conv, layer in zip(model.convs, hyper, strict=True):
        _copy_hyper(conv, layer)
    return model.eval()


@torch.no_grad()
def unet_from_layers(dense, hyper, path: str, lam: float) -> UNet:
    """The U-Net for one ``lam``, evaluating one hyper-layer at a time from the file, so
    the (3.5 GB for the official model) hypernetwork is never held in memory at once."""
    config = _unet_config(dense, hyper, path)
    shell = HyperUNet(UNetConfig(hyp_units=config.hyp_units, enc_nf=(1,), dec_nf=(1,),
                                 add_nf=(), num_chan=1))
    for linear, layer in zip(shell.hyper, dense, strict=True):
        _copy_linear(linear, *layer.arrays)
    h = shell.hyper_features(lam)
    unet = UNet(config)
    for conv, layer in zip(unet.convs, hyper, strict=True):
        arrays = [torch.from_numpy(np.asarray(a[()], np.float32)) for a in layer.arrays]
        weight, bias = hyper_conv_weights(h, arrays[0].T, arrays[1], arrays[2].T, arrays[3],
                                          conv.in_channels, conv.out_channels)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        del arrays
    return unet.eval()


@dataclass
class KerasModels:
    """What one weights file holds: a feature detector, a deformable network, or both."""

    affine: AffineDetector | None = None
    deform: UNet | HyperUNet | None = None


def load_keras(path: str | Path, *, rigid: bool = False, lam: float | None = None,
               want_affine: bool = True, want_deform: bool = True) -> KerasModels:
    """Load a Keras SynthMorph weights file.

    Parameters
    ----------
    path : path to the ``.h5`` file.
    rigid : build the feature detector as a rigid model (rigid weights look like affine ones).
    lam : evaluate the hypernetwork for this regularisation weight and return a plain
        :class:`UNet`; ``None`` returns the :class:`HyperUNet`.
    want_affine, want_deform : skip the parts that are not needed.
    """
    path = str(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as err:
        reason = "file not found" if not Path(path).exists() else "not an HDF5 weights file"
        raise WeightsError(f"{path}: {reason} ({err.__class__.__name__})") from None
    with f:
        convs, dense, hyper = _split(read_layers(f, path), path)
        if not convs and not hyper:
            raise WeightsError(f"{path}: holds no SynthMorph layers")
        out = KerasModels()
        if convs and want_affine:
            out.affine = affine_from_layers(convs, path, rigid)
        if hyper and want_deform:
            out.deform = (hyper_unet_from_layers(dense, hyper, path) if lam is None
                          else unet_from_layers(dense, hyper, path, lam))
        return out
