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
import random
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

OPS_DIR = os.path.join(HERE, "ops")
IMPLS = ("auto", "cuda", "ref")        # auto: the kernel for CUDA tensors when it builds, else the reference


def cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, else torch's guess, else wherever an `nvcc` wrapper script points."""
    from torch.utils import cpp_extension
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with contextlib.suppress(OSError, UnicodeDecodeError):   # a shell wrapper: `exec /real/bin/nvcc "$@"`
            m = re.search(r"(/\S+)/bin/nvcc\b", open(nvcc, errors="strict").read(4096))
            candidates.append(m and m.group(1))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                any(os.path.isdir(os.path.join(root, lib)) for lib in ("lib64", "lib")):
            return root
    return None


def _ops_hash():
    h = hashlib.sha256()
    for name in sorted(os.listdir(OPS_DIR)):
        if name.endswith((".cpp", ".cu", ".h")):
            h.update(name.encode() + open(os.path.join(OPS_DIR, name), "rb").read())
    return h.hexdigest()[:16]


def build_dir():
    """Where compiled kernels live: keyed by the sources' hash and the torch/CUDA versions, so edits rebuild."""
    root = os.environ.get("NADA_OPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nada_ops")
    tag = f"torch{torch.__version__}-cu{torch.version.cuda}-{_ops_hash()}".replace("+", "_")
    return os.path.join(root, tag)


@functools.lru_cache(maxsize=None)
def load_ops(require_gpu=True):
    """Build (once per process) and import the CUDA extension. Returns (module, None) or (None, reason)."""
    if not os.path.isfile(os.path.join(OPS_DIR, "nada_ops.cpp")):
        return None, f"no CUDA sources in {OPS_DIR}"
    if require_gpu and not torch.cuda.is_available():
        return None, "no CUDA device"
    if torch.version.cuda is None:
        return None, "this torch is a CPU build"
    home = cuda_home()
    if home is None:
        return None, "CUDA toolkit (nvcc) not found: set CUDA_HOME"
    try:
        return _build_ops(home), None
    except Exception as e:                              # a failed build is remembered: never retried per call
        reason = f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        warnings.warn(f"nada: CUDA ops unavailable ({reason}); using the reference ops. Rebuild with "
                      f"`python nada.py doctor --build-ops`, full log with NADA_VERBOSE_BUILD=1.")
        return None, reason


def _build_ops(home):
    """Compile ops/ with ninja into a private folder under a lock, publishing it with an atomic rename."""
    from torch.utils import cpp_extension
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home                      # torch cached its own guess at import
    final = build_dir()
    lib = os.path.join(final, "nada_ops.so")
    if not os.path.isfile(lib):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with _file_lock(final + ".lock"):
            if not os.path.isfile(lib):
                work = tempfile.mkdtemp(prefix="build-", dir=os.path.dirname(final))
                try:
                    sources = [os.path.join(OPS_DIR, n) for n in ("nada_ops.cpp", "bias_act.cu", "upfirdn2d.cu")]
                    cpp_extension.load("nada_ops", sources, build_directory=work, is_python_module=False,
                                       extra_cuda_cflags=["-O3", "--use_fast_math"], extra_cflags=["-O3"],
                                       verbose=bool(os.environ.get("NADA_VERBOSE_BUILD")))
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(work, final)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    torch.ops.load_library(lib)
    return torch.ops.nada


@contextlib.contextmanager
def _file_lock(path, timeout=900):
    """An flock: the kernel drops it when its holder dies, so a killed build never leaves a stale lock."""
    import fcntl
    with open(path, "a") as f:
        start = time.time()
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() - start > timeout:
                    raise TimeoutError(f"another process has been building {path} for {timeout} s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _use_cuda(x, impl):
    """The dispatch rule: ref -> reference; cuda -> kernel or an error; auto -> kernel iff x is on CUDA and it builds."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref" or (impl == "auto" and not x.is_cuda):
        return False
    if impl == "cuda" and not x.is_cuda:
        raise RuntimeError("impl='cuda' needs a CUDA tensor")
    ops, reason = load_ops()
    if ops is None and impl == "cuda":
        raise RuntimeError(f"impl='cuda' requested but the CUDA ops are unavailable: {reason}")
    return ops is not None


def ops_status(device):
    """One word for the startup line: which path the ops take on this device."""
    if torch.device(device).type != "cuda":
        return "ref (cpu)"
    ops, reason = load_ops()
    return "cuda" if ops is not None else f"ref ({reason})"


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
    if _use_cuda(x, impl):
        return _BiasActCuda.apply(x, b, act == "lrelu", float(alpha), float(gain), -1.0 if clamp is None else float(clamp))
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


class _BiasActCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, lrelu, alpha, gain, clamp):
        ops = load_ops()[0]
        bias = b.to(x.dtype).contiguous() if b is not None else x.new_empty(0)
        y = ops.bias_act(x, bias, lrelu, alpha, gain, clamp)
        ctx.save_for_backward(y)                        # the gradient is rebuilt from the output alone
        ctx.args = (lrelu, alpha, gain, clamp, b is not None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (y,), (lrelu, alpha, gain, clamp, has_bias) = ctx.saved_tensors, ctx.args
        dx = load_ops()[0].bias_act_grad(dy.contiguous(memory_format=_layout(y)), y, lrelu, alpha, gain, clamp)
        db = dx.sum([d for d in range(dx.ndim) if d != 1]) if has_bias and ctx.needs_input_grad[1] else None
        return dx, db, None, None, None, None


def _layout(t):
    return torch.channels_last if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


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
    if _use_cuda(x, impl):
        return _UpFirDn2dCuda.apply(x, f, up, down, tuple(int(p) for p in pad), flip_filter, float(gain))
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


class _UpFirDn2dCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, up, down, pad, flip, gain):
        ops = load_ops()[0]
        y = ops.upfirdn2d(x, f.float().contiguous(), up, down, *pad, flip, gain)
        ctx.save_for_backward(f)
        ctx.args = (x.shape, up, down, pad, flip, gain)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        # The adjoint of upfirdn2d is another upfirdn2d: swap up/down, flip the filter, pad to land on H x W.
        (f,), ((_, _, H, W), up, down, (x0, x1, y0, y1), flip, gain) = ctx.saved_tensors, ctx.args
        fh, fw = f.shape
        oh, ow = dy.shape[2:]
        gpad = (fw - x0 - 1, W * up - ow * down + x0 - up + 1, fh - y0 - 1, H * up - oh * down + y0 - up + 1)
        dx = load_ops()[0].upfirdn2d(dy, f.float().contiguous(), down, up, *gpad, not flip, gain)
        return dx, None, None, None, None, None, None


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
    sd, config, latent_avg = read_checkpoint(path)
    with torch.device("meta"):                          # no random init: the file's tensors are assigned as they are
        G = Generator(**config, impl=impl)
    try:
        G.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise NadaError(f"{path}: the tensors do not fit a StyleGAN2 generator: {_first_line(e)}") from None
    G.latent_avg = latent_avg.float().reshape(G.w_dim)
    G.requires_grad_(True)
    return G.to(device)


def _first_line(e):
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] if lines else type(e).__name__


def read_checkpoint(path):
    """-> (rosinality-named state dict, Generator kwargs, latent_avg) from a .pt or .pkl file."""
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
        raise NadaError(f"{path}: refused or unreadable torch checkpoint: {_first_line(e)}") from None
    if isinstance(ckpt, dict) and "g_ema" in ckpt:
        sd, meta = ckpt["g_ema"], ckpt.get("nada") or {}
    elif isinstance(ckpt, dict) and "style.1.weight" in ckpt:
        sd, meta = ckpt, {}
    else:
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise NadaError(f"{path}: no generator found (expected a 'g_ema' state dict; found {keys})")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NadaError(f"{path}: 'g_ema' is not a state dict of tensors")
    sd = {k: v.clone() for k, v in sd.items()}         # one private copy of g_ema alone, out of the mapped file
    config = _infer_config(path, sd)
    config.update({k: meta["config"][k] for k in ("lr_mlp", "conv_clamp") if k in meta.get("config", {})})
    latent_avg = ckpt.get("latent_avg") if "g_ema" in ckpt else None
    if latent_avg is None:                              # old files without it: the mean of many mapped z is standard
        latent_avg = _estimate_latent_avg(sd, config)
    return sd, config, latent_avg


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


def _estimate_latent_avg(sd, config, n=4096):
    with torch.device("meta"):
        G = Generator(**config, impl="ref")
    G.load_state_dict(sd, strict=True, assign=True)
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
        if self.class_name.startswith(("Discriminator", "AugmentPipe")):
            self.state = {}                             # not needed: free its tensors as soon as they are built


class _EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict."""


def _load_storage_safely(b):
    # NVIDIA pickles wrap each storage in a nested legacy torch.save; read it with the restricted loader too.
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _pickle_allowlist():
    import importlib
    np_multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    allowed = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch.storage", "_load_from_bytes"): _load_storage_safely,
        ("numpy", "dtype"): np.dtype,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "scalar")] = np_multiarray.scalar
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals an NVIDIA network pickle needs (formats.md 1.4); anything else is refused."""

    allowed = None

    def find_class(self, module, name):
        if (module, name) == ("dnnlib.tflib.network", "Network"):
            raise pickle.UnpicklingError("this is a TensorFlow StyleGAN pickle; convert it to PyTorch first "
                                         "(stylegan2-ada-pytorch's legacy.py), or use the PyTorch release")
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a StyleGAN2 network pickle never needs")
        return self.allowed[(module, name)]


def _read_nvidia_pickle(path):
    try:
        with open(path, "rb") as f:
            unpickler = _SafeUnpickler(f)
            unpickler.allowed = _pickle_allowlist()
            data = unpickler.load()
    except Exception as e:
        raise NadaError(f"{path}: refused, not a loadable network pickle: {_first_line(e)}") from None
    G = data.get("G_ema") if isinstance(data, dict) else None
    if not isinstance(G, _Persistent) or G.class_name != "Generator":
        raise NadaError(f"{path}: no 'G_ema' generator in this pickle")
    return _convert_nvidia(path, G)


def _flatten(obj, prefix=""):
    """Parameters and buffers of a pickled module tree, with their state-dict names."""
    out = {}
    for kind in ("_parameters", "_buffers"):
        out.update({prefix + k: v.detach() for k, v in obj.state.get(kind, {}).items() if v is not None})
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
    sd = _flatten(G)
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
    return out, config, latent_avg if latent_avg is not None else _estimate_latent_avg(out, config)


def save_generator(G, path, **meta):
    """Write a rosinality-compatible checkpoint (g_ema + latent_avg) with our metadata, atomically."""
    state = {"g_ema": {k: v.detach().cpu() for k, v in G.state_dict().items()},
             "latent_avg": G.latent_avg.detach().cpu(), "nada": {"format": 1, "config": G.config(), **meta}}
    atomic_save(state, path)


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
