"""
nada: text-driven domain adaptation of a pretrained StyleGAN2 generator (StyleGAN-NADA), in one file.

A frozen and a trainable copy of a generator render the same latents; a directional CLIP loss pushes the
change between their images, in CLIP space, to point the same way as the change between two prompts
("photo" -> "pencil sketch"). Only some layers train, so content stays and style moves.

    python nada.py train --ckpt ffhq --src photo --tgt "pencil sketch"     # adapt a generator
    python nada.py sample --seeds 0-7 --compare                           # look at the result
    python nada.py sample --ckpt my.pkl --class bird --n 8                # any StyleGAN2 checkpoint
    python nada.py doctor --build-ops                                     # what runs, and why

References: Gal et al., StyleGAN-NADA (arXiv 2108.00946); Karras et al., StyleGAN2 (arXiv 1912.04958);
Radford et al., CLIP (arXiv 2103.00020). Checkpoint formats: rosinality/stylegan2-pytorch and
NVlabs/stylegan2-ada-pytorch (read for facts, no code copied).

Copy-paste contract: nada.py alone runs everywhere on the pure-PyTorch reference ops. Put ops/ beside
it and the CUDA kernels (written for this project from the math, same licence) are built on first use.
Checkpoints we write are rosinality-style state dicts that load with strict=True in rosinality tools.
"""

import argparse
import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SQRT2 = math.sqrt(2.0)
LRELU_SLOPE = 0.2                      # StyleGAN2's leaky ReLU slope
BLUR = (1, 3, 3, 1)                    # StyleGAN2's resampling filter, outer product with itself
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class NadaError(Exception):
    """A problem with the user's input: the CLI prints it in one line and exits with code 2."""


# ----------------------------------------------------------------------------------------------------------
# ops: bias_act and upfirdn2d, each a pure-PyTorch reference plus an optional CUDA kernel from ops/

IMPLS = ("auto", "cuda", "ref")        # auto: the kernel for CUDA tensors when it builds, else the reference
OPS = ("bias_act", "upfirdn2d")


@functools.lru_cache(maxsize=None)
def ops_build():
    """ops/build.py beside this file, imported at the first CUDA use of an op (never at import), or None."""
    path = os.path.join(HERE, "ops", "build.py")
    if not os.path.isfile(path):
        return None
    import importlib.util
    spec = importlib.util.spec_from_file_location("nada_ops_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_op(op, require_gpu=True):
    """The compiled op, built on first use. -> (torch.ops.nada, None) or (None, the reason it is unavailable)."""
    build = ops_build()
    return build.load_op(op, require_gpu) if build else (None, "no ops/ folder beside nada.py")


def _use_cuda(x, impl, op):
    """The dispatch rule: ref -> reference; cuda -> kernel or an error; auto -> kernel iff x is on CUDA and it builds."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref" or (impl == "auto" and not x.is_cuda):
        return False
    if impl == "cuda" and not x.is_cuda:
        raise RuntimeError("impl='cuda' needs a CUDA tensor")
    ops, reason = load_op(op)
    if ops is None and impl == "cuda":
        raise RuntimeError(f"impl='cuda' requested but the CUDA {op} op is unavailable: {reason}")
    return ops is not None


def ops_status(device, impl="auto"):
    """For the startup line: which path each op takes on this device, and why."""
    if impl == "ref" or torch.device(device).type != "cuda":
        return "ref" if impl == "ref" else "ref (cpu)"
    status = {op: "cuda" if load_op(op)[0] else f"ref ({load_op(op)[1]})" for op in OPS}
    return " ".join(f"{op}={s}" for op, s in status.items())


def bias_act(x, b=None, act="linear", alpha=LRELU_SLOPE, gain=1.0, clamp=None, impl="auto"):
    """Fused y = clamp(gain * act(x + b), -clamp, clamp), bias on dim 1.

    Args:
        x: input of any rank >= 2, bias broadcast along dim 1.
        b: bias [C] or None.  act: "linear" or "lrelu" (slope alpha).  gain: scale after the activation.
        clamp: clamp the output to [-clamp, clamp] after the gain, or None.
        impl: "auto" | "cuda" | "ref". The CUDA kernel saves only y for backward; first-order gradients only.
    Returns: a tensor like x.
    """
    if act not in ("linear", "lrelu"):
        raise ValueError(f"unknown activation {act!r}")
    if _use_cuda(x, impl, "bias_act"):
        return _bias_act_cuda(x, b, act == "lrelu", float(alpha), float(gain), -1.0 if clamp is None else float(clamp))
    return _bias_act_ref(x, b, act, alpha, gain, clamp)


def _bias_act_ref(x, b, act, alpha, gain, clamp):
    if b is not None:
        x = x + b.reshape([1, -1] + [1] * (x.ndim - 2)).to(x.dtype)
    if act == "lrelu":
        x = F.leaky_relu(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def _bias_act_cuda(x, b, lrelu, alpha, gain, clamp):
    """The kernel: one torch.library op (ops/register.py gives its first-order gradient and its fake for
    torch.compile). b keeps its own dtype: its gradient is summed in float32 and returned in that dtype."""
    dense = x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return torch.ops.nada.bias_act(x if dense else x.contiguous(), b, lrelu, alpha, gain, clamp)


def upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), flip_filter=False, gain=1.0, impl="auto"):
    """Upsample (zero insertion), pad, FIR-filter and downsample a batch of images, per channel.

    Args:
        x: [N, C, H, W].  f: float32 filter [fh, fw], used as a true convolution unless flip_filter.
        up, down: integer factors, same on both axes.  pad: (x0, x1, y0, y1) on the upsampled grid; negative crops.
        gain: multiplies the filter.  impl: "auto" | "cuda" | "ref".
    Returns: [N, C, (H*up + y0 + y1 - fh) // down + 1, (W*up + x0 + x1 - fw) // down + 1].
    """
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    if _use_cuda(x, impl, "upfirdn2d"):
        return _upfirdn2d_cuda(x, f, up, down, tuple(int(p) for p in pad), flip_filter, float(gain))
    return _upfirdn2d_ref(x, f, up, down, pad, flip_filter, gain)


def _upfirdn2d_ref(x, f, up, down, pad, flip_filter, gain):
    N, C, H, W = x.shape
    x0, x1, y0, y1 = pad
    if up > 1:                                          # insert up-1 zeros after every sample
        x = x.reshape(N, C, H, 1, W, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(N, C, H * up, W * up)
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0):x.shape[2] - max(-y1, 0), max(-x0, 0):x.shape[3] - max(-x1, 0)]
    f = (f * gain).to(x.dtype)
    if not flip_filter:                                 # conv2d correlates; a true convolution flips the taps
        f = f.flip([0, 1])
    x = F.conv2d(x, f[None, None].repeat(C, 1, 1, 1), groups=C)
    return x[:, :, ::down, ::down]


def _upfirdn2d_cuda(x, f, up, down, pad, flip, gain):
    """The kernel: one torch.library op whose gradient (ops/register.py) is another upfirdn2d, to any order."""
    return torch.ops.nada.upfirdn2d(x, f.to(x.device, torch.float32), up, down, *pad, flip, gain)


def make_kernel(k=BLUR):
    """The normalised 2-D FIR filter: outer product of the 1-D taps, summing to 1."""
    k = torch.tensor(k, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


# ----------------------------------------------------------------------------------------------------------
# StyleGAN2 generator (skip architecture), with rosinality's module names: its state dict is the checkpoint API

class PixelNorm(nn.Module):
    """Normalise each latent to unit second moment (NVIDIA's normalize_2nd_moment)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: raw weights, scaled by lr_mul / sqrt(fan_in) at run time."""
    impl = "auto"                                       # ops path; Generator.set_impl changes it

    def __init__(self, in_dim, out_dim, bias_init=0.0, lr_mul=1.0, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_dim], float(bias_init)))
        self.scale, self.lr_mul, self.activation = lr_mul / math.sqrt(in_dim), lr_mul, activation

    def forward(self, x):
        if self.activation:                             # the mapping network: lrelu(x W^T + b) * sqrt(2)
            x = F.linear(x, self.weight * self.scale)
            return bias_act(x, self.bias * self.lr_mul, "lrelu", gain=SQRT2, impl=self.impl)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class Blur(nn.Module):
    """FIR low-pass after a transposed convolution; `kernel` is stored with the upsampling gain (x4)."""
    impl = "auto"                                       # ops path; Generator.set_impl changes it

    def __init__(self, pad, gain):
        super().__init__()
        self.register_buffer("kernel", make_kernel() * gain)
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad, impl=self.impl)


class Upsample(Blur):
    """2x upsampling of the RGB skip image: zero insertion, then the blur."""

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=2, pad=self.pad, impl=self.impl)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution (paper eq. 1-3): per-sample weights, run as one grouped conv."""

    def __init__(self, in_ch, out_ch, kernel_size, style_dim, demodulate=True, upsample=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        if upsample:                                    # a 3x3 transposed conv grows H to 2H+1; blur pads back to 2H
            self.blur = Blur(pad=(1, 1), gain=4)
        self.scale = 1 / math.sqrt(in_ch * kernel_size ** 2)
        self.demodulate, self.upsample, self.padding = demodulate, upsample, kernel_size // 2

    def forward(self, x, w):
        N, I, H, W = x.shape
        O, k = self.weight.shape[1], self.weight.shape[-1]
        styles = self.modulation(w).view(N, 1, I, 1, 1)
        weight = self.scale * self.weight * styles                                    # [N, O, I, k, k]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(N, O, 1, 1, 1)
        x = x.reshape(1, N * I, H, W)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(N * I, O, k, k)                   # [N*I, O, k, k]
            x = F.conv_transpose2d(x, weight.to(x.dtype), stride=2, groups=N)
            return self.blur(x.view(N, O, *x.shape[2:]))
        x = F.conv2d(x, weight.reshape(N * O, I, k, k).to(x.dtype), padding=self.padding, groups=N)
        return x.view(N, O, H, W)


class NoiseInjection(nn.Module):
    """Adds per-pixel noise scaled by a learned strength."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, noise):
        return x if noise is None else x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    """Bias, leaky ReLU, gain sqrt(2), and NVIDIA's optional conv_clamp, in one op."""
    impl = "auto"                                       # ops path; Generator.set_impl changes it

    def __init__(self, channels, clamp=None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.clamp = clamp

    def forward(self, x):
        return bias_act(x, self.bias, "lrelu", gain=SQRT2, clamp=self.clamp, impl=self.impl)


class ConstantInput(nn.Module):
    """The learned 4x4 input of the synthesis network."""

    def __init__(self, channels, size=4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, n):
        return self.input.repeat(n, 1, 1, 1)


class StyledConv(nn.Module):
    """Modulated conv -> noise -> bias + lrelu."""

    def __init__(self, in_ch, out_ch, style_dim, upsample=False, clamp=None):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch, clamp)

    def forward(self, x, w, noise=None):
        return self.activate(self.noise(self.conv(x, w), noise))


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB (no demodulation), added to the upsampled image of the previous block."""
    impl = "auto"                                       # ops path; Generator.set_impl changes it

    def __init__(self, in_ch, style_dim, upsample=True, clamp=None):
        super().__init__()
        if upsample:
            self.upsample = Upsample(pad=(2, 1, 2, 1), gain=4)
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.clamp = clamp

    def forward(self, x, w, skip=None):
        out = bias_act(self.conv(x, w), self.bias.view(3), clamp=self.clamp, impl=self.impl)
        return out if skip is None else out + self.upsample(skip)


def default_channels(size, channel_multiplier=2):
    """rosinality's widths: 512 up to 32 px, then halving with the multiplier."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    return {r: c * channel_multiplier if r >= 64 else c for r, c in base.items() if r <= size}


class Generator(nn.Module):
    """StyleGAN2 generator: mapping (z, c) -> ws, synthesis ws -> image in about [-1, 1].

    Arguments are the architecture; `load_generator` infers them from a checkpoint's tensor shapes.
    """

    def __init__(self, size, style_dim=512, n_mlp=8, channels=None, z_dim=None, c_dim=0, embed_dim=None,
                 lr_mlp=0.01, conv_clamp=None, impl="auto"):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {size}")
        channels = {int(r): int(c) for r, c in (channels or default_channels(size)).items()}
        self.size, self.z_dim, self.w_dim, self.c_dim = size, z_dim or style_dim, style_dim, c_dim
        self.n_mlp, self.lr_mlp, self.conv_clamp, self.channels = n_mlp, lr_mlp, conv_clamp, channels
        self.embed_dim = (embed_dim or style_dim) if c_dim else 0
        self.log_size = int(math.log2(size))
        self.num_ws = self.n_latent = self.log_size * 2 - 2
        if c_dim:                                       # NVIDIA's class embedding, concatenated to the normalised z
            self.embed = EqualLinear(c_dim, self.embed_dim)
        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(self.z_dim + self.embed_dim if i == 0 else style_dim, style_dim, lr_mul=lr_mlp,
                        activation="lrelu") for i in range(n_mlp)])
        self.input = ConstantInput(channels[4])
        self.conv1 = StyledConv(channels[4], channels[4], style_dim, clamp=conv_clamp)
        self.to_rgb1 = ToRGB(channels[4], style_dim, upsample=False, clamp=conv_clamp)
        self.convs, self.to_rgbs, self.noises = nn.ModuleList(), nn.ModuleList(), nn.Module()
        self.upsamples = nn.ModuleList()                # empty, as in rosinality
        for i in range(self.num_ws - 1):                # noise_i has resolution 2^((i + 5) // 2)
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        for r in (2 ** k for k in range(3, self.log_size + 1)):
            self.convs.append(StyledConv(channels[r // 2], channels[r], style_dim, upsample=True, clamp=conv_clamp))
            self.convs.append(StyledConv(channels[r], channels[r], style_dim, clamp=conv_clamp))
            self.to_rgbs.append(ToRGB(channels[r], style_dim, clamp=conv_clamp))
        self.register_buffer("latent_avg", torch.zeros(style_dim), persistent=False)   # saved beside g_ema
        self.meta = {}                                  # load_generator: the metadata our checkpoints carry
        self.set_impl(impl)
        self.eval()

    def set_impl(self, impl):
        """Choose the ops path ("auto" | "cuda" | "ref") for every layer."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        for m in self.modules():
            m.impl = impl
        return self

    @property
    def img_resolution(self):
        return self.size

    def config(self):
        """Everything needed to rebuild this architecture (saved in our checkpoints)."""
        return dict(size=self.size, style_dim=self.w_dim, n_mlp=self.n_mlp, channels=self.channels,
                    z_dim=self.z_dim, c_dim=self.c_dim, embed_dim=self.embed_dim or None,
                    lr_mlp=self.lr_mlp, conv_clamp=self.conv_clamp)

    def mapping(self, z, c=None, truncation=1.0, truncation_cutoff=None):
        """z [N, z_dim] (+ one-hot c [N, c_dim]) -> ws [N, num_ws, w_dim], truncated toward latent_avg."""
        x = self.style[0](z.float())
        if self.c_dim:
            if c is None:
                raise ValueError(f"this generator is class-conditional (c_dim {self.c_dim}): pass c")
            x = torch.cat([x, self.style[0](self.embed(c.float()))], dim=1)
        w = self.style[1:](x)
        ws = w[:, None].repeat(1, self.num_ws, 1)
        if truncation != 1:
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cut] = self.latent_avg.lerp(ws[:, :cut], truncation)
        return ws

    def make_noise(self, n=1, generator=None, device=None):
        """Fresh noise maps for every layer, in the order the layers consume them."""
        return [torch.randn(n, 1, b.shape[2], b.shape[3], generator=generator, device=device or b.device)
                for b in self.noises.buffers()]

    def synthesis(self, ws, noise_mode="const", noise=None):
        """ws [N, num_ws, w_dim] -> images [N, 3, size, size]. noise_mode: const | random | none, or explicit noise."""
        if noise is None:
            if noise_mode == "const":
                noise = list(self.noises.buffers())
            elif noise_mode == "random":
                noise = self.make_noise(ws.shape[0], device=ws.device)
            elif noise_mode == "none":
                noise = [None] * (self.num_ws - 1)
            else:
                raise ValueError(f"noise_mode must be const, random or none, got {noise_mode!r}")
        ws = ws.float()
        x = self.conv1(self.input(ws.shape[0]), ws[:, 0], noise[0])
        img = self.to_rgb1(x, ws[:, 1])
        for i, (up, conv, to_rgb) in enumerate(zip(self.convs[::2], self.convs[1::2], self.to_rgbs)):
            # block i (resolution 8 * 2^i) reads ws[2i+1], ws[2i+2] for its convs, ws[2i+3] for toRGB
            x = up(x, ws[:, 2 * i + 1], noise[2 * i + 1])
            x = conv(x, ws[:, 2 * i + 2], noise[2 * i + 2])
            img = to_rgb(x, ws[:, 2 * i + 3], img)
        return img

    def forward(self, z, c=None, truncation=1.0, noise_mode="const"):
        return self.synthesis(self.mapping(z, c, truncation), noise_mode)


# ----------------------------------------------------------------------------------------------------------
# loading checkpoints: rosinality .pt, NVIDIA .pkl and our own, without ever executing code from the file

LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def load_generator(path, device="cpu", impl="auto"):
    """Load a StyleGAN2 generator from any supported checkpoint file -> Generator in eval mode."""
    sd, config, latent_avg, meta = read_checkpoint(path)
    G = _assemble(path, sd, config, impl)
    G.meta = meta                                       # what our own checkpoints record (prompts, base, ...)
    if not isinstance(latent_avg, torch.Tensor) or latent_avg.numel() != G.w_dim:
        raise NadaError(f"{path}: latent_avg is not a vector of {G.w_dim} numbers")
    G.latent_avg = latent_avg.float().reshape(G.w_dim).clone()
    return G.requires_grad_(True).to(device)


def _assemble(path, sd, config, impl="auto"):
    """A Generator holding the given tensors themselves: built on the meta device, so no random init and no copy."""
    try:
        with torch.device("meta"):
            G = Generator(**config, impl=impl)
        G.load_state_dict(sd, strict=True, assign=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise NadaError(f"{path}: the tensors do not fit a StyleGAN2 generator: {_first_line(e)}") from None
    return G


def _refusal(e):
    """torch.load's weights-only refusal in one line (its own text suggests weights_only=False: never do that)."""
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
    if m:
        return f"it asks for {m.group(1)}, which is not plain tensor data (refused; nothing ran)"
    return "not plain tensor data (refused; nothing ran)" if "Weights only load failed" in str(e) else _first_line(e)


def _first_line(e):
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] if lines else type(e).__name__


def read_checkpoint(path):
    """-> (rosinality-named state dict, Generator kwargs, latent_avg, our metadata or {}) from a .pt or .pkl file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NadaError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path) or head.startswith(LEGACY_TORCH_MAGIC):
        return _read_torch_checkpoint(path)
    return _read_nvidia_pickle(path)


def _read_torch_checkpoint(path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):   # rosinality training checkpoints carry args
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise NadaError(f"{path}: refused or unreadable torch checkpoint: {_refusal(e)}") from None
    if isinstance(ckpt, dict) and "g_ema" in ckpt:
        sd, meta = ckpt["g_ema"], ckpt.get("nada") if isinstance(ckpt.get("nada"), dict) else {}
    elif isinstance(ckpt, dict) and "style.1.weight" in ckpt:
        sd, meta = ckpt, {}
    else:
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise NadaError(f"{path}: no generator found (expected a 'g_ema' state dict; found {keys})")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NadaError(f"{path}: 'g_ema' is not a state dict of tensors")
    sd = {k: v.clone() for k, v in sd.items()}         # one private copy of g_ema alone, out of the mapped file
    config = _infer_config(path, sd)
    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    config.update({k: saved[k] for k in ("lr_mlp", "conv_clamp") if k in saved})
    latent_avg = ckpt.get("latent_avg") if "g_ema" in ckpt else None
    if latent_avg is None:                              # old files without it: the mean of many mapped z is standard
        latent_avg = _estimate_latent_avg(path, sd, config)
    latent_avg = latent_avg.clone() if isinstance(latent_avg, torch.Tensor) else latent_avg
    return sd, config, latent_avg, meta


def _infer_config(path, sd):
    """Architecture from rosinality tensor shapes: nothing is assumed about widths or mapping depth."""
    try:
        n_mlp = sum(1 for k in sd if re.fullmatch(r"style\.\d+\.weight", k))
        style_dim, in0 = sd["style.1.weight"].shape
        c_dim, embed_dim = (sd["embed.weight"].shape[1], sd["embed.weight"].shape[0]) if "embed.weight" in sd else (0, 0)
        n_rgb = sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k))
        channels = {4: sd["input.input"].shape[1]}
        for j in range(n_rgb):
            channels[2 ** (j + 3)] = sd[f"convs.{2 * j}.conv.weight"].shape[1]
    except (KeyError, ValueError, AttributeError) as e:
        raise NadaError(f"{path}: not a StyleGAN2 generator state dict (missing or malformed {e})") from None
    return dict(size=2 ** (n_rgb + 2), style_dim=style_dim, n_mlp=n_mlp, channels=channels, z_dim=in0 - embed_dim,
                c_dim=c_dim, embed_dim=embed_dim or None, lr_mlp=0.01, conv_clamp=None)


def _estimate_latent_avg(path, sd, config, n=4096):
    G = _assemble(path, sd, config, impl="ref")
    with torch.no_grad():
        z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(0))
        c = F.one_hot(torch.arange(n) % G.c_dim, G.c_dim) if G.c_dim else None
        return G.mapping(z, c)[:, 0].mean(0)


class _Persistent:
    """Stands in for an NVIDIA `persistent_class` object: keeps its pickled state, never runs its source."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise pickle.UnpicklingError("malformed persistent object")
        self.class_name = str(meta.get("class_name"))
        self.state = meta["state"]


class _EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict."""


BLOB_MIN = 1 << 20                     # pickle writes payloads this big outside its frames, straight from the file


class _Blob:
    """A large byte string of the pickle, left on disk: its offset and size."""

    def __init__(self, f, offset, size):
        self.f, self.offset, self.size = f, offset, size

    def read(self):
        self.f.seek(self.offset)
        data = self.f.read(self.size)
        if len(data) != self.size:
            raise EOFError("the file ends inside a tensor")
        return data


class _BlobFile:
    """A file whose large reads return a _Blob and skip ahead: unpickling then never holds tensor bytes."""

    def __init__(self, f):
        self.f = f

    def read(self, n=-1):
        if n is not None and n >= BLOB_MIN:
            blob = _Blob(self.f, self.f.tell(), n)
            self.f.seek(n, 1)
            return blob
        return self.f.read(n)

    def readline(self):
        return self.f.readline()


class _TensorRef:
    """A tensor not built yet: its storage's bytes (a _Blob or bytes) and _rebuild_tensor_v2's other arguments."""

    def __init__(self, storage_bytes, args):
        self.storage_bytes, self.args = storage_bytes, args


def _pickle_allowlist():
    """The globals an NVIDIA network pickle may name, mapped to safe stand-ins (formats.md 1.4). Tensors come out
    as _TensorRefs: nothing is decoded until we know which ones G_ema holds."""
    import importlib
    np_multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    as_data = lambda data, *args: data                  # requires_grad and hooks do not matter here
    allowed = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("torch.storage", "_load_from_bytes"): lambda b: b,
        ("torch._utils", "_rebuild_tensor_v2"): lambda storage_bytes, *args: _TensorRef(storage_bytes, args),
        ("torch._utils", "_rebuild_parameter"): as_data,
        ("torch._utils", "_rebuild_parameter_with_state"): as_data,
        ("numpy", "dtype"): np.dtype,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "scalar")] = np_multiarray.scalar
    return allowed


class _SafeUnpickler(pickle._Unpickler):
    """Resolves only the allow-listed globals; anything else is refused before it can run. (Python's own
    unpickler, not the C one, so that large reads can stay on disk through _BlobFile.)"""

    allowed = None

    def find_class(self, module, name):
        if (module, name) == ("dnnlib.tflib.network", "Network"):
            raise pickle.UnpicklingError("this is a TensorFlow StyleGAN pickle; convert it to PyTorch first "
                                         "(stylegan2-ada-pytorch's legacy.py), or use the PyTorch release")
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a StyleGAN2 network pickle never needs")
        return self.allowed[(module, name)]


def read_g_ema(path):
    """The pickled G_ema module tree of an NVIDIA network pickle, with its tensors built and no others.

    G and D are in the file too; their tensors are never read from disk, so memory holds one generator.
    """
    try:
        with open(path, "rb") as f:
            unpickler = _SafeUnpickler(_BlobFile(f))
            unpickler.allowed = _pickle_allowlist()
            data = unpickler.load()
            G = data.get("G_ema") if isinstance(data, dict) else None
            if not isinstance(G, _Persistent) or G.class_name != "Generator":
                raise NadaError(f"{path}: no 'G_ema' generator in this pickle")
            _build_tensors(G, {})
    except NadaError:
        raise
    except Exception as e:
        raise NadaError(f"{path}: refused, not a loadable network pickle: {_refusal(e)}") from None
    return G


def _build_tensors(obj, storages):
    """Replace the _TensorRefs of a pickled module tree by tensors, decoding each storage once."""
    for kind in ("_parameters", "_buffers"):
        for name, ref in obj.state.get(kind, {}).items():
            if isinstance(ref, _TensorRef):
                key = id(ref.storage_bytes)
                if key not in storages:                 # each is a nested legacy torch.save: read it restricted too
                    raw = ref.storage_bytes.read() if isinstance(ref.storage_bytes, _Blob) else ref.storage_bytes
                    storages[key] = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
                obj.state[kind][name] = torch._utils._rebuild_tensor_v2(storages[key], *ref.args)
    for child in obj.state.get("_modules", {}).values():
        if isinstance(child, _Persistent):
            _build_tensors(child, storages)


def _read_nvidia_pickle(path):
    G = read_g_ema(path)
    try:
        return _convert_nvidia(path, G)
    except (KeyError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise NadaError(f"{path}: G_ema is not a StyleGAN2 generator this loader knows (missing or malformed "
                        f"{_first_line(e)})") from None


def _flatten(obj, prefix=""):
    """Parameters and buffers of a pickled module tree, with their state-dict names."""
    out = {}
    for kind in ("_parameters", "_buffers"):
        out.update({prefix + k: v for k, v in obj.state.get(kind, {}).items() if v is not None})
    for name, child in obj.state.get("_modules", {}).items():
        if isinstance(child, _Persistent):
            out.update(_flatten(child, f"{prefix}{name}."))
    return out


def _convert_nvidia(path, G):
    """NVIDIA names -> rosinality names (formats.md 3.4); settings from the pickled module attributes."""
    mods = lambda obj: obj.state.get("_modules", {})
    syn, mapping = mods(G).get("synthesis"), mods(G).get("mapping")
    if syn is None or mapping is None:
        raise NadaError(f"{path}: G_ema has no mapping/synthesis networks")
    if "input" in mods(syn) or any(k.startswith("L") for k in mods(syn)):
        raise NadaError(f"{path}: this is a StyleGAN3 generator; nada adapts StyleGAN2 generators only")
    res, c_dim, w_dim = G.state["img_resolution"], G.state["c_dim"], G.state["w_dim"]
    for r in (2 ** k for k in range(2, int(math.log2(res)) + 1)):
        arch = mods(syn)[f"b{r}"].state.get("architecture", "skip")
        if arch != "skip":
            raise NadaError(f"{path}: the '{arch}' synthesis architecture is not supported (only 'skip', "
                            "which every public StyleGAN2 checkpoint uses)")
    if G.state.get("img_channels", 3) != 3:
        raise NadaError(f"{path}: only RGB generators are supported")
    sd = {k: v.detach() for k, v in _flatten(G).items()}
    n_mlp = mapping.state["num_layers"]
    fcs = [mods(mapping)[f"fc{i}"].state for i in range(n_mlp)]
    if any(fc["activation"] != "lrelu" for fc in fcs) or any(sd[f"mapping.fc{i}.weight"].shape[0] != w_dim for i in range(n_mlp)):
        raise NadaError(f"{path}: unsupported mapping network (needs lrelu layers of width w_dim)")
    conv_clamp = mods(mods(syn)["b4"])["conv1"].state.get("conv_clamp")
    out = {}
    for i in range(n_mlp):
        out[f"style.{i + 1}.weight"], out[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.weight"], sd[f"mapping.fc{i}.bias"]
    if c_dim:
        out["embed.weight"], out["embed.bias"] = sd["mapping.embed.weight"], sd["mapping.embed.bias"]
    out["input.input"] = sd["synthesis.b4.const"][None]

    def layer(src, dst):
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"], out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.weight"], sd[f"{src}.affine.bias"]
        out[f"{dst}.noise.weight"] = sd[f"{src}.noise_strength"].reshape(1)
        out[f"{dst}.activate.bias"] = sd[f"{src}.bias"]

    def torgb(src, dst):
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"], out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.weight"], sd[f"{src}.affine.bias"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(1, 3, 1, 1)

    layer("synthesis.b4.conv1", "conv1")
    torgb("synthesis.b4.torgb", "to_rgb1")
    out["noises.noise_0"] = sd["synthesis.b4.conv1.noise_const"][None, None]
    for k in range(3, int(math.log2(res)) + 1):
        b, j = f"synthesis.b{2 ** k}", k - 3
        layer(f"{b}.conv0", f"convs.{2 * j}")
        layer(f"{b}.conv1", f"convs.{2 * j + 1}")
        torgb(f"{b}.torgb", f"to_rgbs.{j}")
        fir = sd[f"{b}.conv0.resample_filter"]
        if fir.shape != (4, 4):
            raise NadaError(f"{path}: only the 4-tap resampling filter of StyleGAN2 is supported")
        out[f"convs.{2 * j}.conv.blur.kernel"] = out[f"to_rgbs.{j}.upsample.kernel"] = fir * 4
        out[f"noises.noise_{2 * k - 5}"] = sd[f"{b}.conv0.noise_const"][None, None]
        out[f"noises.noise_{2 * k - 4}"] = sd[f"{b}.conv1.noise_const"][None, None]
    config = _infer_config(path, out)
    config.update(lr_mlp=float(fcs[0]["bias_gain"]), conv_clamp=conv_clamp)
    latent_avg = sd.get("mapping.w_avg")
    return out, config, latent_avg if latent_avg is not None else _estimate_latent_avg(path, out, config), {}


def save_generator(G, path, **meta):
    """Write a rosinality-compatible checkpoint (g_ema + latent_avg) with our metadata, atomically."""
    state = {"g_ema": {k: v.detach().cpu() for k, v in G.state_dict().items()},
             "latent_avg": G.latent_avg.detach().cpu(), "nada": {"format": 1, "config": G.config(), **meta}}
    atomic_save(state, path)


@contextlib.contextmanager
def atomic_path(path):
    """A temp file beside `path` to write, renamed onto `path` when the block ends without error: a crash or
    Ctrl-C never leaves a half-written file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def atomic_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------------------
# pretrained weights by name: download once into the weights folder, resumable, verified, atomic

ADA = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
NGC = "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan2/versions/1/files/"
GENERATORS = {  # name: (url, resolution, approximate download size in MB, class names if conditional)
    "ffhq": (ADA + "ffhq.pkl", 1024, 364, None),
    "ffhq512": (NGC + "stylegan2-ffhq-512x512.pkl", 512, 364, None),
    "ffhq256": (NGC + "stylegan2-ffhq-256x256.pkl", 256, 280, None),
    "ffhqu": (NGC + "stylegan2-ffhqu-1024x1024.pkl", 1024, 364, None),
    "ffhqu256": (NGC + "stylegan2-ffhqu-256x256.pkl", 256, 280, None),
    "metfaces": (ADA + "metfaces.pkl", 1024, 364, None),
    "metfacesu": (NGC + "stylegan2-metfacesu-1024x1024.pkl", 1024, 364, None),
    "afhqcat": (ADA + "afhqcat.pkl", 512, 347, None),
    "afhqdog": (ADA + "afhqdog.pkl", 512, 347, None),
    "afhqwild": (ADA + "afhqwild.pkl", 512, 347, None),
    "afhqv2": (NGC + "stylegan2-afhqv2-512x512.pkl", 512, 347, None),
    "brecahad": (ADA + "brecahad.pkl", 512, 347, None),
    "celebahq256": (NGC + "stylegan2-celebahq-256x256.pkl", 256, 280, None),
    "lsundog256": (NGC + "stylegan2-lsundog-256x256.pkl", 256, 280, None),
    "cifar10": (ADA + "cifar10.pkl", 32, 242, CIFAR10_CLASSES),
}
DOWNLOAD_TIMEOUT = 10                  # seconds without an answer before we give up: offline fails fast


def weights_dir(override=None):
    """--weights-dir, else $NADA_WEIGHTS, else weights/ beside nada.py."""
    return os.path.abspath(override or os.environ.get("NADA_WEIGHTS") or os.path.join(HERE, "weights"))


def is_offline(flag=False):
    return flag or os.environ.get("NADA_OFFLINE", "") not in ("", "0")


def resolve_ckpt(name_or_path, wdir=None, offline=False):
    """A file path as it is, or a known model name, downloaded on first use -> a local path."""
    if name_or_path and os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path in GENERATORS:
        url = GENERATORS[name_or_path][0]
        return download(url, os.path.join(weights_dir(wdir), os.path.basename(url)), offline=offline)
    raise NadaError(f"--ckpt {name_or_path!r} is neither a file nor a known model; `python nada.py models` lists "
                    f"the names ({', '.join(GENERATORS)})")


def _manifest(folder):
    path = os.path.join(folder, "manifest.json")
    with contextlib.suppress(OSError, ValueError):
        return json.load(open(path))
    return {}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, sha256=None, offline=False):
    """Fetch url to dest through dest.part (resumed when the server allows ranges), verify, rename into place.

    The size is always checked; the SHA-256 against `sha256` when the source publishes one, else against the
    hash recorded in the folder's manifest.json at the first download. $NADA_MIRROR replaces the host.
    """
    folder, name = os.path.split(os.path.abspath(dest))
    record = _manifest(folder).get(name)
    if os.path.isfile(dest):
        if record and os.path.getsize(dest) != record["size"]:
            raise NadaError(f"{dest} has {os.path.getsize(dest)} bytes, not the {record['size']} recorded when it was "
                            "downloaded: delete it to download it again")
        return dest
    mirror = os.environ.get("NADA_MIRROR")
    if mirror:
        url = mirror.rstrip("/") + "/" + os.path.basename(url)
    hand = f"fetch {url} yourself and place it at {dest}"
    if is_offline(offline):
        raise NadaError(f"{name} is not in {folder} and nada is offline (--offline or NADA_OFFLINE): {hand}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise NadaError(f"cannot create the weights folder {folder}: {e.strerror}; choose another with --weights-dir")
    part = dest + ".part"
    _fetch(url, part, hand)
    digest = sha256_file(part)
    expected = sha256 or (record or {}).get("sha256")
    if expected and digest != expected:
        os.remove(part)
        raise NadaError(f"{name}: SHA-256 mismatch (got {digest[:12]}..., expected {expected[:12]}...); "
                        f"the download was removed; try again, or {hand}")
    os.replace(part, dest)
    manifest = _manifest(folder)
    manifest[name] = {"url": url, "size": os.path.getsize(dest), "sha256": digest}
    atomic_write_text(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=1))
    return dest


def _fetch(url, part, hand):
    """Stream url into part with a progress bar, resuming an earlier partial download."""
    import urllib.error
    import urllib.request
    from tqdm import tqdm
    start = os.path.getsize(part) if os.path.isfile(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "nada", **({"Range": f"bytes={start}-"} if start else {})})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:                     # the .part is already complete
            return
        raise NadaError(f"could not download {os.path.basename(part)[:-5]} (HTTP {e.code} {e.reason}); {hand}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise NadaError(f"could not download {os.path.basename(part)[:-5]} ({reason}); {hand}") from None
    with response:
        if start and response.status != 206:          # the server ignored the range: start over
            start = 0
        length = response.headers.get("Content-Length")
        total = int(length) + start if length else None
        try:
            with open(part, "ab" if start else "wb") as f, \
                    tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=os.path.basename(url).split("?")[0],
                         disable=None, leave=False) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise NadaError(f"download of {os.path.basename(part)[:-5]} broke off ({e}); run again to resume, or {hand}") from None
    if total is not None and os.path.getsize(part) != total:
        raise NadaError(f"download of {os.path.basename(part)[:-5]} broke off at {os.path.getsize(part)} of {total} "
                        f"bytes; run again to resume, or {hand}")


# ----------------------------------------------------------------------------------------------------------
# directional CLIP loss (NADA eq. 2): the image change between the generators should follow the text change

# CLIP's 80 ImageNet prompt templates, published by OpenAI with CLIP (Prompt_Engineering_for_ImageNet.ipynb),
# used here as data. NADA averages text embeddings over them.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DIRECTION_EPS = 1e-2                   # soft norm of the image direction: finite loss and gradient when it is 0


def _import_clip():
    with warnings.catch_warnings():                     # clip-anytorch imports pkg_resources, which warns
        warnings.simplefilter("ignore")
        import clip
    return clip


def load_clip(name, device="cpu", wdir=None, offline=False):
    """A CLIP model by name (downloaded into the weights folder) or from a local file; float32, frozen."""
    clip = _import_clip()
    if os.path.isfile(name):
        path = name
    elif name in clip.available_models():
        url = clip.clip._MODELS[name]
        path = download(url, os.path.join(weights_dir(wdir), os.path.basename(url)), sha256=url.split("/")[-2],
                        offline=offline)
    else:
        raise NadaError(f"unknown CLIP model {name!r}: use a file path or one of {', '.join(clip.available_models())}")
    try:
        with warnings.catch_warnings():                 # clip.load tries torch.jit.load first, which is deprecated
            warnings.simplefilter("ignore")
            model, _ = clip.load(path, device="cpu", jit=False)
    except Exception as e:
        raise NadaError(f"{path}: not a loadable CLIP model: {_first_line(e)}") from None
    return model.float().eval().requires_grad_(False).to(device)


def clip_preprocess(img, model):
    """Images in [-1, 1] -> CLIP's input, differentiably: resize the short side, centre crop, normalise."""
    n = model.visual.input_resolution
    x = (img.float() + 1) / 2
    h, w = x.shape[2:]
    size = (n, max(n, round(w * n / h))) if h <= w else (max(n, round(h * n / w)), n)
    if (h, w) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=size[0] < h)
    top, left = (x.shape[2] - n) // 2, (x.shape[3] - n) // 2
    x = x[:, :, top:top + n, left:left + n]
    mean, std = torch.tensor(CLIP_MEAN, device=x.device), torch.tensor(CLIP_STD, device=x.device)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def encode_images(model, img):
    """Unit-norm CLIP embeddings [N, D] of images in [-1, 1]."""
    return F.normalize(model.encode_image(clip_preprocess(img, model)).float(), dim=-1)


@torch.no_grad()
def encode_prompts(model, text, templates=IMAGENET_TEMPLATES):
    """Unit-norm CLIP embeddings [T, D] of `text` in every template."""
    tokens = _import_clip().tokenize([t.format(text) for t in templates], truncate=True).to(next(model.parameters()).device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


def text_direction(model, source, target, templates=IMAGENET_TEMPLATES):
    """NADA's text direction: mean over templates of (target - source) unit embeddings, normalised. [D]"""
    return F.normalize((encode_prompts(model, target, templates) - encode_prompts(model, source, templates)).mean(0), dim=0)


@torch.no_grad()
def image_direction(model, target_images, generated):
    """Image-target mode (NADA's style images): mean unit embedding of the target images (a list, any sizes)
    minus that of the generated images, normalised. -> (direction [D], unit target embedding [D])"""
    target = torch.cat([encode_images(model, img) for img in target_images]).mean(0)
    return F.normalize(target - encode_images(model, generated).mean(0), dim=0), F.normalize(target, dim=0)


def directional_loss(emb_frozen, emb_adapted, direction, eps=DIRECTION_EPS):
    """NADA's directional CLIP loss: mean over the batch of 1 - cos(image change, direction).

    Args:
        emb_frozen, emb_adapted: unit CLIP embeddings [N, D] of the frozen and the adapted generator's images
            for the same latents.  direction: the unit text (or image-target) direction [D].
        eps: the image change d is divided by sqrt(|d|^2 + eps^2) rather than |d|, so that at step 0, where the
            two generators agree and d = 0, the loss is exactly 1 with a finite gradient of size 1/eps instead of
            0/0 (NaN). For |d| >> eps (|d| is about 0.1-1 once training moves) it is the plain cosine.
    Returns: a scalar.
    """
    d = emb_adapted - emb_frozen
    d = d / torch.sqrt(d.pow(2).sum(-1, keepdim=True) + eps ** 2)
    return (1 - d @ direction).mean()


def global_loss(emb, target):
    """1 - cos(image, target embedding): how far each image is from the target (used by auto layer selection)."""
    return (1 - emb @ target).mean()


# ----------------------------------------------------------------------------------------------------------
# layer freezing: which synthesis layers train. A "layer" is a module prefix of the rosinality layout.

def synthesis_blocks(G):
    """[(resolution, layer names)]: a block is its two convs and its toRGB (the 4 px block: constant, conv1, toRGB)."""
    blocks = [(4, ["input", "conv1", "to_rgb1"])]
    for j in range(len(G.to_rgbs)):
        blocks.append((2 ** (j + 3), [f"convs.{2 * j}", f"convs.{2 * j + 1}", f"to_rgbs.{j}"]))
    return blocks


def layers_driven_by(G, j):
    """The layers that read ws[j] in G.synthesis: conv1 <- ws[0]; convs[j-1] <- ws[j]; the toRGBs read odd j.

    (The original NADA maps W+ index i to convs[i-2], one off from this.)
    """
    if j == 0:
        return ["conv1"]
    layers = [f"convs.{j - 1}"] if j - 1 < len(G.convs) else []
    if j % 2 == 1:
        layers.append("to_rgb1" if j == 1 else f"to_rgbs.{(j - 3) // 2}")
    return layers


def parse_layers(spec, G):
    """--layers -> a list of layer names, or None for `auto` (chosen anew at every step)."""
    blocks = synthesis_blocks(G)
    spec = str(spec).strip()
    if spec == "auto":
        return None
    if spec == "all":
        return [name for _, names in blocks for name in names]
    m = re.fullmatch(r"(last|first):(\d+)", spec)
    if m:
        n = int(m.group(2))
        if not 1 <= n <= len(blocks):
            raise NadaError(f"--layers {spec}: N must be 1..{len(blocks)} for this {G.size} px generator")
        chosen = blocks[-n:] if m.group(1) == "last" else blocks[:n]
        return [name for _, names in chosen for name in names]
    try:
        resolutions = [int(r) for r in spec.split(",")]
    except ValueError:
        resolutions = None
    known = {r: names for r, names in blocks}
    if not resolutions or any(r not in known for r in resolutions):
        raise NadaError(f"--layers {spec!r}: use auto, all, last:N, first:N or resolutions from {sorted(known)}")
    return [name for r in resolutions for name in known[r]]


def set_trainable(G, layers):
    """requires_grad on the parameters of `layers` only (the mapping network never trains). -> their count."""
    prefixes = tuple(name + "." for name in layers)
    count = 0
    for name, p in G.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        count += p.numel() if p.requires_grad else 0
    return count


def select_layers_auto(G, ws, clip_models, k, lr=0.01):
    """NADA's adaptive layer selection: one SGD step on W+ codes against the global CLIP loss toward the target;
    the k W+ entries that moved most name the layers to train (through `layers_driven_by`).

    ws: [B, num_ws, w_dim] from the frozen mapping. clip_models: [(model, weight, direction, target embedding)].
    """
    ws = ws.detach().clone().requires_grad_(True)
    img = G.synthesis(ws, noise_mode="const")
    loss = sum(weight * global_loss(encode_images(model, img), target) for model, weight, _, target in clip_models)
    (grad,) = torch.autograd.grad(loss, ws)             # the generator's own weights get no gradient here
    moved = (lr * grad).abs().mean(dim=(0, 2))          # [num_ws]: |w_new - w_old| after one SGD step
    chosen = torch.topk(moved, k).indices.tolist()
    return _in_block_order(G, [name for j in chosen for name in layers_driven_by(G, j)])


def _in_block_order(G, names):
    """The given layer names, sorted as the synthesis network runs them."""
    names = set(names)
    return [n for _, block in synthesis_blocks(G) for n in block if n in names]


# ----------------------------------------------------------------------------------------------------------
# train: adapt a copy of the generator with the directional CLIP loss

LR = 0.002 * 4 / 5                     # NADA's effective Adam settings (rosinality's lazy-regularisation ratio 4/5)
BETAS = (0.0, 0.99 ** (4 / 5))
SAMPLE_TRUNCATION = 0.7                # previews, as in NADA
RESUME_MUST_MATCH = ("ckpt", "src", "tgt", "tgt_img", "clip", "clip_weights", "layers", "auto_k", "batch", "lr",
                     "mixing", "seed", "cls")


def pick_device(device="auto"):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise NadaError("--device cuda, but torch sees no CUDA device (use --device cpu, or check `python nada.py doctor`)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise NadaError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def class_labels(G, cls, n, generator=None):
    """One-hot labels [n, c_dim] for --class NAME|INDEX|all, or None for an unconditional generator."""
    if not G.c_dim:
        if cls is not None:
            raise NadaError(f"--class {cls}: this generator is unconditional")
        return None
    names = CIFAR10_CLASSES if G.c_dim == 10 else ()
    if cls is None:
        raise NadaError(f"this generator is class-conditional ({G.c_dim} classes): pass --class "
                        f"{'NAME, ' if names else ''}INDEX (0-{G.c_dim - 1}) or all" + (f"; names: {', '.join(names)}" if names else ""))
    if str(cls) == "all":
        idx = torch.randint(G.c_dim, (n,), generator=generator) if generator is not None else torch.arange(n) % G.c_dim
    elif str(cls) in names:
        idx = torch.full((n,), names.index(str(cls)))
    elif str(cls).isdigit() and int(cls) < G.c_dim:
        idx = torch.full((n,), int(cls))
    else:
        raise NadaError(f"--class {cls}: unknown class; use " + (f"one of {', '.join(names)}, " if names else "")
                        + f"an index 0-{G.c_dim - 1}, or all")
    return F.one_hot(idx, G.c_dim).float()


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "run"


def _check_prompts(src, tgt, tgt_img):
    if tgt_img:
        missing = [p for p in tgt_img if not os.path.isfile(p)]
        if missing:
            raise NadaError(f"--tgt-img: no such file: {missing[0]}")
        return
    if not (src or "").strip() or not (tgt or "").strip():
        raise NadaError("--src and --tgt must both be non-empty prompts, e.g. --src photo --tgt \"pencil sketch\"")
    if src.strip().lower() == tgt.strip().lower():
        raise NadaError(f"--src and --tgt are the same ({src!r}): there is no direction to move in")


def _check_numbers(**values):
    """Each value is (number, lowest allowed, highest allowed or None)."""
    for name, (v, lo, hi) in values.items():
        if v < lo or (hi is not None and v > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise NadaError(f"--{name.replace('_', '-')} {v}: must be {bound}")


def _run_settings(run):
    """The settings a run was started with (its config.json), or {} if there is none."""
    with contextlib.suppress(OSError, ValueError):
        cfg = json.load(open(os.path.join(run, "config.json")))
        return {k: cfg[k] for k in RESUME_MUST_MATCH + ("iters",) if k in cfg}
    return {}


def _prepare_out(out, resume, settings):
    """Create or reopen the run folder; refuse to mix a resumed run with other settings."""
    if resume:
        cfg_path = os.path.join(resume, "config.json")
        if not os.path.isfile(os.path.join(resume, "state.pt")) or not os.path.isfile(cfg_path):
            raise NadaError(f"--resume {resume}: no interrupted run there (needs config.json and state.pt)")
        old = _run_settings(resume)
        diff = [k for k in RESUME_MUST_MATCH if old.get(k) != settings.get(k)]
        if diff:
            k = diff[0]
            raise NadaError(f"--resume {resume}: the run used --{k.replace('_', '-')} {old.get(k)!r}, not "
                            f"{settings.get(k)!r}; resume with the same settings or start a new --out")
        return resume
    if os.path.isfile(os.path.join(out, "state.pt")):
        raise NadaError(f"{out} holds a run already: continue it with --resume {out}, or choose another --out")
    try:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise NadaError(f"cannot write the output folder {out}: {e.strerror}; choose another with --out") from None
    atomic_write_text(os.path.join(out, "config.json"), json.dumps(settings, indent=1))
    return out


def _load_clip_models(names, weights, device, wdir, offline, preloaded=None):
    names = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError:
            raise NadaError(f"--clip-weights {weights!r}: give numbers separated by commas") from None
    if not names or len(weights) != len(names):
        raise NadaError(f"--clip-weights has {len(weights)} values for {len(names)} CLIP models ({', '.join(names)})")
    models = preloaded or [load_clip(n, device, wdir, offline) for n in names]
    return names, [float(w) for w in weights], models


def _load_image(path):
    from PIL import Image
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:
        raise NadaError(f"{path}: not a readable image ({_first_line(e)})") from None
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def _directions(clip_models, weights, G, src, tgt, images, cls, gen, device):
    """[(model, weight, direction, global target)] per CLIP model, computed once per run."""
    if images:
        with torch.no_grad():
            c = class_labels(G, cls, 16, gen)
            generated = G(torch.randn(16, G.z_dim, generator=gen).to(device), None if c is None else c.to(device))
    out = []
    for model, weight in zip(clip_models, weights):
        if images:
            direction, target = image_direction(model, [img.to(device) for img in images], generated)
        else:                                           # the target prompt, template-averaged, guides auto layers
            direction, target = text_direction(model, src, tgt), F.normalize(encode_prompts(model, tgt).mean(0), dim=0)
        out.append((model, weight, direction, target))
    return out


def train(src="photo", tgt="sketch", ckpt="ffhq", out=None, iters=300, batch=2, lr=LR, mixing=0.0, layers="auto",
          auto_k=None, clip="ViT-B/32", clip_weights=None, tgt_img=None, cls=None, seed=0, device="auto",
          impl="auto", sample_every=50, save_every=50, n_sample=4, resume=None, wdir=None, offline=False,
          progress=True, clip_models=None):
    """Adapt a generator from `src` to `tgt` (or toward the images `tgt_img`); returns the run folder.

    The run folder holds generator.pt (the adapted generator), log.jsonl, config.json, samples/ and state.pt
    (optimizer and RNG state for --resume). `clip_models` may pass CLIP modules already loaded (for tests).
    """
    tgt_img = list(tgt_img or [])
    _check_prompts(src, tgt, tgt_img)
    _check_numbers(iters=(iters, 1, None), batch=(batch, 1, None), lr=(lr, 1e-12, None), mixing=(mixing, 0, 1),
                   sample_every=(sample_every, 1, None), save_every=(save_every, 1, None), n_sample=(n_sample, 1, None))
    images = [_load_image(p) for p in tgt_img]
    device = pick_device(device)
    settings = dict(ckpt=ckpt, src=src, tgt=tgt, tgt_img=tgt_img, clip=clip, clip_weights=clip_weights, layers=layers,
                    auto_k=auto_k, batch=batch, lr=lr, mixing=mixing, seed=seed, cls=cls, iters=iters)
    if out is None:
        out = os.path.join("runs", f"{_slug(src)}_to_{_slug(tgt if not tgt_img else 'images')}")
    G_frozen = load_generator(resolve_ckpt(ckpt, wdir, offline), device, impl).requires_grad_(False)
    class_labels(G_frozen, cls, 1)                      # bad --class fails before anything is written
    fixed_layers = parse_layers(layers, G_frozen)
    k = auto_k or G_frozen.num_ws
    if not 1 <= k <= G_frozen.num_ws:
        raise NadaError(f"--auto-k must be 1..{G_frozen.num_ws} for this generator")
    names, weights, models = _load_clip_models(clip, clip_weights, device, wdir, offline, clip_models)
    out = _prepare_out(out, resume, settings)
    G = copy.deepcopy(G_frozen)
    params = [p for name, p in G.named_parameters() if not name.startswith(("style.", "embed."))]
    opt = torch.optim.Adam(params, lr=lr, betas=BETAS)
    gen = torch.Generator().manual_seed(seed)           # every random draw of the run, so resume replays exactly
    start = _resume_state(out, G, opt, gen) if resume else 0
    clip_set = _directions(models, weights, G_frozen, src, tgt, images, cls, torch.Generator().manual_seed(seed + 1), device)
    sample_z = torch.randn(n_sample, G.z_dim, generator=torch.Generator().manual_seed(seed + 2))
    sample_c = class_labels(G, cls, n_sample, torch.Generator().manual_seed(seed + 3))
    shown = f"auto, top {k} of {G.num_ws} W+ entries per step" if fixed_layers is None else layers
    if fixed_layers is None and k >= G.num_ws:          # every W+ entry chosen: the selection is moot, skip its cost
        fixed_layers = _in_block_order(G, [n for j in range(G.num_ws) for n in layers_driven_by(G, j)])
    if fixed_layers is not None:
        shown += f" ({len(fixed_layers)} layers, {set_trainable(G, fixed_layers) / 1e6:.2f}M params)"
    print(f"nada train | device {device} | ops {ops_status(device, impl)} | CLIP "
          f"{', '.join(f'{n} x{w:g}' for n, w in zip(names, weights))} | layers {shown} | {G.size} px, "
          f"{'images' if tgt_img else repr(src)} -> {tgt_img or repr(tgt)} | out {out}", flush=True)
    meta = dict(src=src, tgt=tgt, tgt_img=tgt_img, base=os.path.abspath(ckpt) if os.path.isfile(ckpt) else ckpt, layers=layers, clip=names, clip_weights=weights,
                seed=seed, cls=cls)
    log_path = os.path.join(out, "log.jsonl")
    _truncate_log(log_path, start)
    if start == 0:
        _save_preview(G_frozen, G, sample_z, sample_c, os.path.join(out, "samples", f"{0:06d}.png"))
    t0 = time.time()
    from tqdm import tqdm
    bar = tqdm(total=iters, initial=start, disable=None if progress else True, dynamic_ncols=True, desc="train")
    with _deferred_interrupt() as stop:                 # Ctrl-C lands between steps, never inside one
        for step in range(start, iters):
            trained, loss, losses = train_step(G_frozen, G, opt, clip_set, fixed_layers, k, batch, mixing, cls, gen, device)
            if not math.isfinite(loss):
                raise NadaError(f"the loss became {loss} at step {step}; stopped. The last good checkpoint "
                                f"(step {_saved_step(out)}) is in {out}. Try a lower --lr.")
            with open(log_path, "a") as f:
                f.write(json.dumps(dict(iter=step, loss=loss, losses=dict(zip(names, losses)), layers=trained,
                                        seconds=round(time.time() - t0, 3))) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            done = step + 1
            if done % sample_every == 0 or done == iters:
                _save_preview(G_frozen, G, sample_z, sample_c, os.path.join(out, "samples", f"{done:06d}.png"))
            if done % save_every == 0 or done == iters or stop:
                _save_run(out, G, opt, gen, done, meta)
            if stop:
                bar.close()
                print(f"\ninterrupted: saved at step {done} in {out}; continue with "
                      f"`python nada.py train --resume {out}`", flush=True)
                raise KeyboardInterrupt
    bar.close()
    print(f"done: {iters} steps in {time.time() - t0:.1f} s; adapted generator: {os.path.join(out, 'generator.pt')}")
    return out


def train_step(G_frozen, G, opt, clip_set, fixed_layers, k, batch, mixing, cls, gen, device):
    """One optimisation step on a fresh batch. -> (trained layers, loss, per-CLIP-model losses)."""
    z = torch.randn(batch, G.z_dim, generator=gen).to(device)
    c = class_labels(G, cls, batch, gen)
    c = None if c is None else c.to(device)
    noise = [n.to(device) for n in G.make_noise(batch, generator=gen, device="cpu")]   # the same noise in both
    with torch.no_grad():
        ws = G_frozen.mapping(z, c)
        if mixing > 0 and torch.rand((), generator=gen).item() < mixing:               # style mixing
            cut = int(torch.randint(1, G.num_ws, (), generator=gen))
            ws2 = G_frozen.mapping(torch.randn(batch, G.z_dim, generator=gen).to(device), c)
            ws = torch.cat([ws[:, :cut], ws2[:, cut:]], dim=1)
        img_frozen = G_frozen.synthesis(ws, noise=noise)
    layers = fixed_layers
    if layers is None:
        z_sel = torch.randn(8, G.z_dim, generator=gen).to(device)
        c_sel = class_labels(G, cls, 8, gen)
        with torch.no_grad():
            ws_sel = G_frozen.mapping(z_sel, None if c_sel is None else c_sel.to(device))
        layers = select_layers_auto(G, ws_sel, clip_set, k)
    set_trainable(G, layers)
    img = G.synthesis(ws, noise=noise)
    losses = []
    for model, weight, direction, _ in clip_set:
        with torch.no_grad():
            emb_frozen = encode_images(model, img_frozen)
        losses.append(weight * directional_loss(emb_frozen, encode_images(model, img), direction))
    loss = sum(losses)
    if torch.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return layers, loss.item(), [l.item() for l in losses]


class _deferred_interrupt:
    """Turns the first Ctrl-C into a flag the loop checks after each step; a second one stops at once."""

    def __enter__(self):
        self.flag, self.previous = False, None
        with contextlib.suppress(ValueError):           # not the main thread: leave signals alone
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __bool__(self):
        return self.flag

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _save_run(out, G, opt, gen, step, meta):
    """generator.pt (the deliverable) and state.pt (everything --resume needs), each written atomically."""
    save_generator(G, os.path.join(out, "generator.pt"), iterations=step, **meta)
    atomic_save({"step": step, "optimizer": opt.state_dict(), "rng": gen.get_state(),
                 "g_ema": {k: v.detach().cpu() for k, v in G.state_dict().items()}}, os.path.join(out, "state.pt"))


def _saved_step(out):
    path = os.path.join(out, "state.pt")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"] if os.path.isfile(path) else 0


def _resume_state(out, G, opt, gen):
    state = torch.load(os.path.join(out, "state.pt"), map_location="cpu", weights_only=True)
    G.load_state_dict(state["g_ema"], strict=True)
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["rng"])
    return state["step"]


def _truncate_log(path, start):
    """On resume, drop log lines of steps that will run again."""
    if os.path.isfile(path):
        lines = [ln for ln in open(path) if ln.strip() and json.loads(ln)["iter"] < start]
        atomic_write_text(path, "".join(lines))


@torch.no_grad()
def _save_preview(G_frozen, G, z, c, path):
    """Frozen generator's row above the adapted generator's row, same latents, truncation 0.7."""
    device = G.latent_avg.device
    z, c = z.to(device), None if c is None else c.to(device)
    rows = [g.synthesis(G_frozen.mapping(z, c, SAMPLE_TRUNCATION)) for g in (G_frozen, G)]
    save_image(make_grid(torch.cat(rows), ncol=len(z)), path)


def to_uint8(img):
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3], NVIDIA's rounding."""
    return (img.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(img, ncol):
    """[N, 3, H, W] -> [1, 3, rows*H, ncol*W], row-major, blank tiles at the end."""
    N, C, H, W = img.shape
    rows = -(-N // ncol)
    img = torch.cat([img, img.new_full((rows * ncol - N, C, H, W), -1.0)])
    return img.view(rows, ncol, C, H, W).permute(2, 0, 3, 1, 4).reshape(1, C, rows * H, ncol * W)


def save_image(img, path):
    """Write one image [1, 3, H, W] in [-1, 1] as a PNG, atomically."""
    from PIL import Image
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(img)[0]).save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------------------
# sample: render a generator (or the base next to the adapted one) at chosen seeds

def parse_seeds(spec):
    """'0-15' or '1,5,9' (or a mix) -> [int]."""
    seeds = []
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise NadaError(f"--seeds {spec!r}: use a range like 0-15 or a list like 1,5,9")
        seeds += list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return seeds


def latest_run_generator(root="runs"):
    found = [os.path.join(root, d, "generator.pt") for d in (os.listdir(root) if os.path.isdir(root) else [])]
    found = [p for p in found if os.path.isfile(p)]
    if not found:
        raise NadaError(f"no --ckpt given and no trained generator in {root}/*/generator.pt: pass --ckpt FILE or NAME")
    return max(found, key=os.path.getmtime)


def seed_latents(G, seeds):
    """One z per seed from NumPy's RandomState(seed), as NVIDIA's generate.py: the same on every machine. [N, z_dim]"""
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(G.z_dim) for s in seeds])).float()


@torch.no_grad()
def sample(ckpt=None, seeds=None, n=8, trunc=1.0, noise_mode="const", cls=None, device="auto", out=None,
           compare=False, impl="auto", wdir=None, offline=False):
    """Render one PNG per seed and a grid.png; with compare, the base generator beside the adapted one."""
    _check_numbers(n=(n, 1, None))
    seeds = parse_seeds(seeds) if seeds is not None else list(range(n))
    if noise_mode not in ("const", "random", "none"):
        raise NadaError(f"--noise-mode must be const, random or none, got {noise_mode!r}")
    device = pick_device(device)
    path = resolve_ckpt(ckpt, wdir, offline) if ckpt else latest_run_generator()
    G = load_generator(path, device, impl)
    gens = [G]
    if compare:
        base = G.meta.get("base")
        if not base:
            raise NadaError(f"--compare: {path} records no base generator (only checkpoints written by `train` do)")
        gens = [load_generator(resolve_ckpt(base, wdir, offline), device, impl), G]
    labels = class_labels(G, cls, len(seeds))
    out = out or os.path.join(os.path.dirname(path) if os.path.basename(path) == "generator.pt" else "samples",
                              "sample" if os.path.basename(path) == "generator.pt" else _slug(os.path.splitext(os.path.basename(path))[0]))
    os.makedirs(out, exist_ok=True)
    print(f"nada sample | {path} | device {device} | ops {ops_status(device, impl)} | "
          f"{len(seeds)} seeds, truncation {trunc}, noise {noise_mode}", flush=True)
    rows = [[] for _ in gens]
    for i, s in enumerate(seeds):
        z = seed_latents(G, [s]).to(device)
        c = None if labels is None else labels[i:i + 1].to(device)
        noise = G.make_noise(1, torch.Generator().manual_seed(s), "cpu") if noise_mode == "random" else None
        ws = gens[0].mapping(z, c, trunc)               # compare: the same ws (from the base) for both
        imgs = []
        for row, g in zip(rows, gens):
            img = g.synthesis(ws, noise_mode, None if noise is None else [t.to(device) for t in noise])
            row.append(img.cpu())
            imgs.append(img.cpu())
        save_image(torch.cat(imgs, dim=3), os.path.join(out, f"seed{s:04d}.png"))
    grid = make_grid(torch.cat([torch.cat(r) for r in rows]), ncol=len(seeds) if compare else math.ceil(math.sqrt(len(seeds))))
    save_image(grid, os.path.join(out, "grid.png"))
    print(f"wrote {len(seeds)} images and grid.png to {out}")
    return out




# ----------------------------------------------------------------------------------------------------------
# models: the named generators and what is already downloaded

def list_models(wdir=None):
    folder = weights_dir(wdir)
    print(f"weights folder: {folder}")
    print(f"{'name':<12} {'px':>5} {'size':>8}  {'status':<11} url")
    for name, (url, res, mb, classes) in GENERATORS.items():
        path = os.path.join(folder, os.path.basename(url))
        here = os.path.isfile(path)
        size = f"{os.path.getsize(path) / 2 ** 20:.0f} MB" if here else f"~{mb} MB"
        extra = f"  (conditional: {len(classes)} classes)" if classes else ""
        print(f"{name:<12} {res:>5} {size:>8}  {'downloaded' if here else '-':<11} {url}{extra}")
    print("CLIP models (--clip): ViT-B/32 (338 MB), ViT-B/16 (335 MB), ViT-L/14 (890 MB), RN50 (244 MB), ...; "
          "downloaded into the same folder on first use")


# ----------------------------------------------------------------------------------------------------------
# doctor: what this machine has, and which ops path will run

def doctor(device="auto", build_ops=False, wdir=None):
    """Print the environment; -> 0 when everything the chosen device needs is there, else 1."""
    ok = True
    cuda = torch.cuda.is_available()
    print(f"python       {sys.version.split()[0]}")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"GPU          {torch.cuda.get_device_name(0) if cuda else 'none visible'}")
    build = ops_build()
    home = build.cuda_home() if build else None
    print(f"CUDA toolkit {home or 'not found (set CUDA_HOME to the folder holding bin/nvcc)'}")
    print(f"ninja        {shutil.which('ninja') or _ninja_from_pip() or 'not found (pip install ninja)'}")
    try:
        _import_clip()
        print("CLIP         clip-anytorch importable")
    except Exception as e:
        ok = False
        print(f"CLIP         MISSING: {_first_line(e)} (pip install -r requirements.txt)")
    folder = weights_dir(wdir)
    present = [f for f in os.listdir(folder) if f.endswith((".pkl", ".pt"))] if os.path.isdir(folder) else []
    print(f"weights      {folder} ({len(present)} files{': ' + ', '.join(sorted(present)) if present else ''})")
    if device == "cuda" and not cuda:
        ok = False
        print("device       cuda requested but no CUDA device is visible: install a CUDA build of torch and a driver")
    if build_ops:
        for op in OPS:
            t0 = time.time()
            ops, reason = load_op(op, require_gpu=False)
            where = f", {build.build_dir(op)}" if build else ""
            print(f"build {op:<10}{'ok' if ops else 'FAILED: ' + reason} ({time.time() - t0:.1f} s{where})")
            ok = ok and ops is not None
    print(f"ops path     {ops_status(pick_device(device) if device != 'cuda' or cuda else 'cpu')}")
    return 0 if ok else 1


def _ninja_from_pip():
    with contextlib.suppress(ImportError):
        import ninja
        return os.path.join(ninja.BIN_DIR, "ninja")
    return None


# ----------------------------------------------------------------------------------------------------------
# command line

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one and the help text does not already say it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser(typed_only=False):
    """The CLI. typed_only: train's run settings default to None, so a parse shows which ones were typed."""
    fmt = _HelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help="auto | cpu | cuda")
    common.add_argument("--impl", default="auto", choices=IMPLS, help="ops path: auto = CUDA kernels when they build")
    common.add_argument("--weights-dir", dest="wdir", default=None, help="where named weights are kept "
                        "(default: $NADA_WEIGHTS, else weights/ beside nada.py)")
    common.add_argument("--offline", action="store_true", help="never touch the network (also NADA_OFFLINE=1)")
    p = argparse.ArgumentParser(prog="nada.py", description=__doc__.split("\n\n")[0].strip(), formatter_class=fmt)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", parents=[common], formatter_class=fmt, help="adapt a generator from text",
                       description="Adapt a pretrained StyleGAN2 generator from --src to --tgt with the directional CLIP loss.")
    t.add_argument("--src", default="photo", help="source prompt")
    t.add_argument("--tgt", default="sketch", help="target prompt")
    t.add_argument("--tgt-img", nargs="+", default=None, help="target images instead of a target prompt")
    t.add_argument("--ckpt", default="ffhq", help="base generator: a file or a name from `nada.py models`")
    t.add_argument("--class", dest="cls", default=None, help="class-conditional generators: NAME, INDEX or all")
    t.add_argument("--clip", default="ViT-B/32", help="CLIP models, comma-separated names or files")
    t.add_argument("--clip-weights", default=None, help="their loss weights, comma-separated (default: 1 each)")
    t.add_argument("--layers", default="auto", help="auto | all | last:N | first:N | resolutions like 16,32")
    t.add_argument("--auto-k", type=int, default=None, help="auto: train the layers of the top K W+ entries "
                   "(default: all of them)")
    t.add_argument("--iters", type=int, default=300, help="training steps")
    t.add_argument("--batch", type=int, default=2, help="latents per step")
    t.add_argument("--lr", type=float, default=LR, help="Adam, betas (0, 0.99^0.8): NADA's effective values")
    t.add_argument("--mixing", type=float, default=0.0, help="style-mixing probability (0.9 helps shape changes)")
    t.add_argument("--seed", type=int, default=0, help="seeds every random draw; same seed, same run")
    t.add_argument("--out", default=None, help="run folder (default: runs/<src>_to_<tgt>)")
    t.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted run")
    t.add_argument("--sample-every", type=int, default=50, help="write a preview grid every N steps")
    t.add_argument("--save-every", type=int, default=50, help="write generator.pt and state.pt every N steps")
    t.add_argument("--n-sample", type=int, default=4, help="preview columns (fixed seeds)")
    if typed_only:
        t.set_defaults(**{k: None for k in RESUME_MUST_MATCH + ("iters",)})

    s = sub.add_parser("sample", parents=[common], formatter_class=fmt, help="render images from a generator")
    s.add_argument("--ckpt", default=None, help="a file or a model name (default: the newest runs/*/generator.pt)")
    s.add_argument("--n", type=int, default=8, help="number of images (seeds 0..n-1) when --seeds is not given")
    s.add_argument("--seeds", default=None, help="e.g. 0-15 or 1,5,9")
    s.add_argument("--trunc", type=float, default=1.0, help="truncation psi toward the average w")
    s.add_argument("--noise-mode", default="const", choices=("const", "random", "none"),
                   help="const: the checkpoint's stored noise; random: seeded per image")
    s.add_argument("--class", dest="cls", default=None, help="conditional generators: NAME or INDEX (or all)")
    s.add_argument("--compare", action="store_true", help="the base generator beside the adapted one")
    s.add_argument("--out", default=None, help="output folder (default: RUN/sample or samples/<ckpt>)")

    m = sub.add_parser("models", parents=[common], formatter_class=fmt, help="list the named generators")
    d = sub.add_parser("doctor", parents=[common], formatter_class=fmt, help="check the environment")
    d.add_argument("--build-ops", action="store_true", help="compile the CUDA ops now (no GPU needed)")
    del m
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    opts = {k: v for k, v in vars(args).items() if k != "cmd"}
    try:
        if args.cmd == "train":
            if args.resume:                             # settings not typed again come from the run itself
                typed = {k for k, v in vars(build_parser(typed_only=True).parse_args(argv)).items() if v is not None}
                opts.update({k: v for k, v in _run_settings(args.resume).items() if k not in typed})
            train(**opts)
        elif args.cmd == "sample":
            sample(**opts)
        elif args.cmd == "models":
            list_models(args.wdir)
        elif args.cmd == "doctor":
            return doctor(args.device, args.build_ops, args.wdir)
    except NadaError as e:
        print(f"nada: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
