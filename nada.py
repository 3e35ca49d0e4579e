"""
nada: text-driven domain adaptation of a pretrained StyleGAN2 generator (StyleGAN-NADA), in one file.

A frozen and a trainable copy of a generator render the same latents; a directional CLIP loss pushes the
change between their images, in CLIP space, to point the same way as the change between two prompts
("photo" -> "pencil sketch"). Only some layers train, so content stays and style moves.

    python nada.py train --ckpt ffhq --src photo --tgt "pencil sketch"     # adapt a generator
    python nada.py sample --seeds 0-7 --compare                           # look at the result
    python nada.py sample --ckpt my.pkl --class bird --n 8                # any StyleGAN2 checkpoint
    python nada.py doctor --build-ops                                     # what runs, and why

The method comes first (ops, generator, CLIP loss, freezing, train, sample), the plumbing below one divider.
nada.py alone runs everywhere on pure-PyTorch reference ops; with ops/ beside it, our CUDA kernels are built
on first use. References: Gal et al., StyleGAN-NADA (arXiv 2108.00946); Karras et al., StyleGAN2 (arXiv
1912.04958); Radford et al., CLIP (arXiv 2103.00020). Checkpoint formats: rosinality/stylegan2-pytorch and
NVlabs/stylegan2-ada-pytorch (read for facts, no code copied); we write rosinality-style state dicts.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import itertools
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
import weakref
import zipfile
import zlib
from collections import OrderedDict, namedtuple

if __name__ == "__main__":             # before torch loads OpenMP: idle threads sleep, so two jobs on a CPU share it
    if os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE") == "default":   # OpenMP's own: spin a while, then sleep
        del os.environ["OMP_WAIT_POLICY"]

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._python_dispatch
import torch.utils.checkpoint

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


def _use_cuda(x, impl, op):
    """The dispatch rule: ref -> reference; cuda -> kernel, or an error; auto -> kernel iff x is on CUDA and it builds.
    """
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
    if up > 1:                                          # insert up-1 zeros after every sample: [N, C, H*up, W*up]
        x = F.pad(x.reshape(N, C, H, 1, W, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(N, C, H * up, W * up)
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0):x.shape[2] - max(-y1, 0), max(-x0, 0):x.shape[3] - max(-x1, 0)]
    f = (f * gain).to(x.dtype)
    if not flip_filter:                                 # conv2d correlates; a true convolution flips the taps
        f = f.flip([0, 1])
    x = F.conv2d(x, f[None, None].repeat(C, 1, 1, 1), groups=C)   # depthwise: [C, 1, fh, fw]
    return x[:, :, ::down, ::down]


def _upfirdn2d_cuda(x, f, up, down, pad, flip, gain):
    """The kernel: one torch.library op whose gradient (ops/register.py) is another upfirdn2d, to any order."""
    return torch.ops.nada.upfirdn2d(x, f.to(x.device, torch.float32), up, down, *pad, flip, gain)


def make_kernel(k=BLUR):
    """The normalised 2-D FIR filter [len(k), len(k)]: outer product of the 1-D taps, summing to 1."""
    k = torch.tensor(k, dtype=torch.float32)
    return torch.outer(k, k) / torch.outer(k, k).sum()


# ----------------------------------------------------------------------------------------------------------
# StyleGAN2 generator (skip architecture), with rosinality's module names: its state dict is the checkpoint API

def normalize_2nd_moment(x, eps=1e-8):
    """Scale each row of x [N, D] to unit mean square: the first step of the mapping network, for z and the class."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


class OpModule(nn.Module):
    """A layer that calls bias_act or upfirdn2d: `impl` picks the ops path; Generator.set_impl sets it on all."""
    impl = "auto"


class EqualLinear(OpModule):
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


class Blur(OpModule):
    """FIR low-pass after a transposed convolution, or with up=2 the skip image's upsampling (zero insertion, then
    the low-pass). `kernel` is stored with the upsampling gain (x4), as in rosinality's checkpoints."""

    def __init__(self, pad, gain, up=1):
        super().__init__()
        self.register_buffer("kernel", make_kernel() * gain)
        self.pad, self.up = pad, up

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.up, pad=self.pad, impl=self.impl)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution (paper eq. 1-3): per-sample weights, run as one grouped conv."""

    def __init__(self, in_ch, out_ch, kernel_size, style_dim, demodulate=True, upsample=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        if upsample:                                    # a 3x3 transposed conv grows H to 2H+1; blur pads back to 2H
            self.blur = Blur(pad=(1, 1), gain=4)
        self.scale = 1 / math.sqrt(in_ch * kernel_size ** 2)   # equalised learning rate: He init at run time
        self.demodulate, self.upsample, self.padding = demodulate, upsample, kernel_size // 2

    def forward(self, x, w):
        N, I, H, W = x.shape
        O, k = self.weight.shape[1], self.weight.shape[-1]
        styles = self.modulation(w).view(N, 1, I, 1, 1)                              # eq. 1: scale input channels
        weight = self.scale * self.weight * styles                                    # [N, O, I, k, k]
        if self.demodulate:                                                           # eq. 3: unit output variance
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(N, O, 1, 1, 1)
        x = x.reshape(1, N * I, H, W)                   # the batch becomes groups: one conv for all samples
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(N * I, O, k, k)                   # [N*I, O, k, k]
            x = F.conv_transpose2d(x, weight.to(x.dtype), stride=2, groups=N)         # [1, N*O, 2H+1, 2W+1]
            return self.blur(x.view(N, O, *x.shape[2:]))                              # [N, O, 2H, 2W]
        x = F.conv2d(x, weight.reshape(N * O, I, k, k).to(x.dtype), padding=self.padding, groups=N)
        return x.view(N, O, H, W)


class NoiseInjection(nn.Module):
    """Adds per-pixel noise [N, 1, H, W] scaled by a learned strength."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, noise):
        return x if noise is None else x + self.weight * noise


class FusedLeakyReLU(OpModule):
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


class ToRGB(OpModule):
    """1x1 modulated conv to RGB (no demodulation), added to the upsampled image of the previous block."""

    def __init__(self, in_ch, style_dim, upsample=True, clamp=None):
        super().__init__()
        if upsample:
            self.upsample = Blur(pad=(2, 1, 2, 1), gain=4, up=2)
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
    """StyleGAN2 generator: mapping (z, c) -> ws, synthesis ws -> image in about [-1, 1]. Arguments are the
    architecture; `load_generator` infers them from a checkpoint's tensor shapes."""

    def __init__(self, size, style_dim=512, n_mlp=8, channels=None, z_dim=None, c_dim=0, embed_dim=None,
                 lr_mlp=0.01, conv_clamp=None, impl="auto"):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {size}")
        channels = {int(r): int(c) for r, c in (channels or default_channels(size)).items()}
        self.size = self.img_resolution = size          # img_resolution: NVIDIA's name for it
        self.z_dim, self.w_dim, self.c_dim = z_dim or style_dim, style_dim, c_dim
        self.n_mlp, self.lr_mlp, self.conv_clamp, self.channels = n_mlp, lr_mlp, conv_clamp, channels
        self.embed_dim = (embed_dim or style_dim) if c_dim else 0
        self.log_size = int(math.log2(size))
        self.num_ws = self.n_latent = self.log_size * 2 - 2   # 2 per block, +1 for the last toRGB, -1 at 4 px
        if c_dim:                                       # NVIDIA's class embedding, concatenated to the normalised z
            self.embed = EqualLinear(c_dim, self.embed_dim)
        self.style = nn.Sequential(nn.Identity(), *[   # [0]: rosinality's PixelNorm, done in mapping
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
        for r in (2 ** k for k in range(3, self.log_size + 1)):   # per block: upsampling conv, conv, toRGB
            self.convs.append(StyledConv(channels[r // 2], channels[r], style_dim, upsample=True, clamp=conv_clamp))
            self.convs.append(StyledConv(channels[r], channels[r], style_dim, clamp=conv_clamp))
            self.to_rgbs.append(ToRGB(channels[r], style_dim, clamp=conv_clamp))
        self.register_buffer("latent_avg", torch.zeros(style_dim), persistent=False)   # saved beside g_ema
        self.meta = {}                                  # load_generator: the metadata our checkpoints carry
        self.checkpointing = False                      # recompute layers in backward instead of keeping them
        self.set_impl(impl)
        self.eval()

    def set_impl(self, impl):
        """Choose the ops path ("auto" | "cuda" | "ref") for every layer."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, OpModule):
                m.impl = impl
        return self

    def config(self):
        """Everything needed to rebuild this architecture (saved in our checkpoints)."""
        return dict(size=self.size, style_dim=self.w_dim, n_mlp=self.n_mlp, channels=self.channels,
                    z_dim=self.z_dim, c_dim=self.c_dim, embed_dim=self.embed_dim or None,
                    lr_mlp=self.lr_mlp, conv_clamp=self.conv_clamp)

    def mapping(self, z, c=None, truncation=1.0, truncation_cutoff=None):
        """z [N, z_dim] (+ one-hot c [N, c_dim]) -> ws [N, num_ws, w_dim], truncated toward latent_avg."""
        x = normalize_2nd_moment(z.float())
        if self.c_dim:
            if c is None:
                raise ValueError(f"this generator is class-conditional (c_dim {self.c_dim}): pass c")
            x = torch.cat([x, normalize_2nd_moment(self.embed(c.float()))], dim=1)   # [N, z_dim + embed_dim]
        w = self.style[1:](x)                                                         # [N, w_dim]
        ws = w[:, None].repeat(1, self.num_ws, 1)       # one w for every layer; style mixing edits rows of ws
        if truncation != 1:
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cut] = self.latent_avg.lerp(ws[:, :cut], truncation)
        return ws

    def make_noise(self, n=1, generator=None, device=None):
        """Fresh noise maps [n, 1, r, r] for every layer, in the order the layers consume them."""
        return [torch.randn(n, 1, b.shape[2], b.shape[3], generator=generator, device=device or b.device)
                for b in self.noises.buffers()]

    def synthesis(self, ws, noise_mode="const", noise=None, stop=None, start=None):
        """ws [N, num_ws, w_dim] -> images [N, 3, size, size]. noise_mode: const | random | none, or explicit noise.

        stop=n: run blocks 0..n-1 only (block 0 is 4 px) -> (n, x, img), which start= continues from.
        """
        if noise is None:
            if noise_mode == "const":
                noise = list(self.noises.buffers())
            elif noise_mode == "random":
                noise = self.make_noise(ws.shape[0], device=ws.device)
            elif noise_mode == "none":
                noise = [None] * (self.num_ws - 1)
            else:
                raise ValueError(f"noise_mode must be const, random or none, got {noise_mode!r}")
        ws, run = ws.float(), self._run_layer
        done, x, img = start or (0, None, None)         # blocks already run, their features and skip image
        if done == 0:
            x = run(self.conv1, self.input(ws.shape[0]), ws[:, 0], noise[0])         # [N, C4, 4, 4]
            img = run(self.to_rgb1, x, ws[:, 1])                                      # [N, 3, 4, 4]
        for i, (up, conv, to_rgb) in enumerate(zip(self.convs[::2], self.convs[1::2], self.to_rgbs)):
            if i + 1 == stop:
                return stop, x, img
            if i + 1 < done:
                continue
            # block i+1 (resolution r = 8 * 2^i) reads ws[2i+1], ws[2i+2] for its convs, ws[2i+3] for toRGB
            x = run(up, x, ws[:, 2 * i + 1], noise[2 * i + 1])                        # [N, Cr, r, r]
            x = run(conv, x, ws[:, 2 * i + 2], noise[2 * i + 2])
            img = run(to_rgb, x, ws[:, 2 * i + 3], img)  # the skip image: upsampled and summed over blocks
        return img

    def _run_layer(self, layer, *inputs):
        """layer(*inputs); with `checkpointing` (--memory low) only the inputs are kept for backward, and the
        layer runs again then: each layer's intermediates (5 full-size maps) never pile up over the network."""
        if self.checkpointing and torch.is_grad_enabled():   # the dry run's MetaAutocast too: replay_modes
            return torch.utils.checkpoint.checkpoint(layer, *inputs, use_reentrant=False, context_fn=replay_modes)
        return layer(*inputs)

    def forward(self, z, c=None, truncation=1.0, noise_mode="const"):
        return self.synthesis(self.mapping(z, c, truncation), noise_mode)


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
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_TEXT_CHANGE = 1e-3                 # a text direction shorter than this: the prompts look the same to CLIP
DIRECTION_EPS = 1e-2                   # soft norm of the image direction: finite loss and gradient when it is 0


def _import_clip():
    with warnings.catch_warnings():                     # clip-anytorch imports pkg_resources, which warns
        warnings.simplefilter("ignore")
        import clip
    return clip


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
def encode_prompts(model, texts, templates=IMAGENET_TEMPLATES):
    """Unit-norm CLIP embeddings [P, T, D] of P texts in T templates, in one batch cut after the longest prompt (CLIP's
    text transformer is causal and reads its output at the end-of-text token: the padding after it changes nothing)."""
    try:                                                # never cut a prompt silently: CLIP reads 77 tokens at most
        tokens = _import_clip().tokenize([t.format(text) for text in texts for t in templates])
    except RuntimeError:
        raise NadaError(f"the prompt {max(texts, key=len)[:40]!r}... does not fit CLIP's 77 tokens in every template: "
                        "shorten it") from None
    tokens, n = tokens.to(next(model.parameters()).device), int(tokens.argmax(-1).max()) + 1   # n: the longest
    try:                                                # clip-anytorch cuts its positions to n; OpenAI's clip takes 77
        emb = model.encode_text(tokens[:, :n])
    except RuntimeError:
        emb = model.encode_text(tokens)
    return F.normalize(emb.float(), dim=-1).view(len(texts), len(templates), -1)


def text_targets(model, source, target, templates=IMAGENET_TEMPLATES):
    """-> (NADA's text direction: the mean over templates of (target - source) unit embeddings, normalised [D]; the
    target prompt's template-mean embedding, normalised [D]). Both prompts go through CLIP in one batch."""
    src, tgt = encode_prompts(model, [source, target], templates)                  # [T, D] each
    change = (tgt - src).mean(0)
    if not change.is_meta and change.norm() < MIN_TEXT_CHANGE:                     # a run would learn nothing
        raise NadaError(f"{source[:40]!r} and {target[:40]!r} look the same to this CLIP model (their text direction "
                        f"has length {change.norm():.1e}): choose prompts that differ")
    return F.normalize(change, dim=0), F.normalize(tgt.mean(0), dim=0)


@torch.no_grad()
def image_direction(model, target_images, generated):
    """Image-target mode (NADA's style images): mean unit embedding of the target images (a list, any sizes)
    minus that of the generated images, normalised. -> (direction [D], unit target embedding [D])"""
    target = torch.cat([encode_images(model, img) for img in target_images]).mean(0)
    return F.normalize(target - encode_images(model, generated).mean(0), dim=0), F.normalize(target, dim=0)


def drop_text_tower(model):
    """Free CLIP's text encoder once the directions are computed (about 250 MB for ViT-B): training reads images."""
    model.transformer = model.token_embedding = model.ln_final = None
    model.positional_embedding = model.text_projection = None
    return model


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


def consistency_loss(emb_frozen, emb_adapted):
    """HyperDomainNet's in-domain angle consistency, a cure for NADA's collapse: the batch's pairwise cosines [N, N]
    after adaptation should be those before it, so images that differed keep differing. Mean squared difference
    over the N(N-1) off-diagonal pairs (0 for a batch of one). Masked, not indexed, so the dry run sees it too."""
    n = len(emb_adapted)
    off = 1 - torch.eye(n, device=emb_adapted.device)
    diff = (emb_adapted @ emb_adapted.T - emb_frozen @ emb_frozen.T) * off
    return diff.pow(2).sum() / max(n * (n - 1), 1)


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
    """The layers that read ws[j] in G.synthesis: conv1 <- ws[0]; convs[j-1] <- ws[j]; the toRGBs read odd j. (The
    original NADA maps W+ index i to convs[i-2], one off from this.)"""
    if j == 0:
        return ["conv1"]
    layers = [f"convs.{j - 1}"] if j - 1 < len(G.convs) else []
    if j % 2 == 1:
        layers.append("to_rgb1" if j == 1 else f"to_rgbs.{(j - 3) // 2}")
    return layers


def in_block_order(G, names):
    """The given layer names, sorted as the synthesis network runs them."""
    names = set(names)
    return [n for _, block in synthesis_blocks(G) for n in block if n in names]


def parse_layers(spec, G, auto_k=None):
    """--layers -> the layer names to train, or, for `auto`, the number k of W+ entries to choose at every step
    (auto with k = num_ws chooses everything: the fixed list of those layers)."""
    blocks = synthesis_blocks(G)
    spec = str(spec).strip()
    if spec == "auto":
        k = G.num_ws if auto_k is None else auto_k
        if not 1 <= k <= G.num_ws:
            raise NadaError(f"--auto-k {k}: must be 1..{G.num_ws} for this {G.size} px generator")
        return k if k < G.num_ws else in_block_order(G, [n for j in range(k) for n in layers_driven_by(G, j)])
    if spec == "all":
        return [name for _, names in blocks for name in names]
    m = re.fullmatch(r"(last|first):(\d+)", spec)
    if m:
        n = int(m.group(2))
        if not 1 <= n <= len(blocks):
            raise NadaError(f"--layers {spec}: N must be 1..{len(blocks)} for this {G.size} px generator")
        return [name for _, names in (blocks[-n:] if m.group(1) == "last" else blocks[:n]) for name in names]
    known = dict(blocks)
    resolutions = [int(r) for r in spec.split(",") if r.strip().isdigit()]
    if len(resolutions) != len(spec.split(",")) or any(r not in known for r in resolutions):
        raise NadaError(f"--layers {spec!r}: use auto, all, last:N, first:N or resolutions from {sorted(known)}")
    return [name for r in resolutions for name in known[r]]


def first_trained_block(G, layers):
    """The index of the first synthesis block (0 is 4 px) that holds one of `layers`."""
    return min(i for i, (_, names) in enumerate(synthesis_blocks(G)) if set(names) & set(layers))


def set_trainable(G, layers):
    """requires_grad on the parameters of `layers` only (the mapping network never trains). -> their count."""
    prefixes = tuple(name + "." for name in layers)
    for name, p in G.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    return sum(p.numel() for p in G.parameters() if p.requires_grad)


def select_layers_auto(G, ws, targets, k, chunk=None, lr=0.01):
    """NADA's adaptive layer selection: one SGD step on W+ codes against the global CLIP loss toward the target;
    the k W+ entries that moved most name the layers to train (through `layers_driven_by`).

    ws: [B, num_ws, w_dim] from the frozen mapping. targets: ClipTargets (their `target` embeddings are used).
    chunk: render at most this many latents at once. Each latent's gradient depends on it alone, so chunks
    weighted by their share of B give the gradient of the whole batch, at the memory of one chunk."""
    grad = torch.zeros_like(ws)
    for i in range(0, len(ws), chunk or len(ws)):
        part = ws[i:i + (chunk or len(ws))].detach().clone().requires_grad_(True)
        img = G.synthesis(part, noise_mode="const")
        loss = sum(t.weight * global_loss(encode_images(t.model, img), t.target) for t in targets)
        (grad[i:i + len(part)],) = torch.autograd.grad(loss * len(part) / len(ws), part)   # G gets no gradient
    moved = (lr * grad).abs().mean(dim=(0, 2))          # [num_ws]: |w_new - w_old| after one SGD step
    chosen = list(range(k)) if moved.is_meta else torch.topk(moved, k).indices.tolist()   # meta: any k cost the same
    return in_block_order(G, [name for j in chosen for name in layers_driven_by(G, j)])


# ----------------------------------------------------------------------------------------------------------
# train: adapt a copy of the generator with the directional CLIP loss

LR = 0.002 * 4 / 5                     # NADA's effective Adam settings (rosinality's lazy-regularisation ratio 4/5)
BETAS = (0.0, 0.99 ** (4 / 5))
SELECTION_BATCH = 8                    # latents that adaptive layer selection looks at each step, as in NADA

ClipTarget = namedtuple("ClipTarget", "model weight direction target")
ClipTarget.__doc__ = """One CLIP model of the loss: its weight, the unit direction [D] the image change should follow,
and the unit target embedding [D] that adaptive layer selection pulls images toward."""


def class_labels(G, cls, n, generator=None):
    """One-hot labels [n, c_dim] for --class NAME|INDEX|all, or None for an unconditional generator. all: classes
    drawn by `generator`, or without one cycling through them."""
    if not G.c_dim:
        if cls is not None:
            raise NadaError(f"--class {cls}: this generator is unconditional")
        return None
    names = CIFAR10_CLASSES if G.c_dim == 10 else ()
    choices = (f"one of {', '.join(names)}, " if names else "") + f"an index 0-{G.c_dim - 1}, or all"
    if cls is None:
        raise NadaError(f"this generator is class-conditional ({G.c_dim} classes): pass --class "
                        + ("NAME, " if names else "") + f"INDEX (0-{G.c_dim - 1}) or all"
                        + (f"; names: {', '.join(names)}" if names else ""))
    if str(cls) == "all":
        idx = torch.arange(n) % G.c_dim if generator is None else torch.randint(G.c_dim, (n,), generator=generator)
    elif str(cls) in names or (str(cls).isdigit() and int(cls) < G.c_dim):
        idx = torch.full((n,), names.index(cls) if cls in names else int(cls))
    else:
        raise NadaError(f"--class {cls}: unknown class; use {choices}")
    return F.one_hot(idx, G.c_dim).float()


def draw_ws(G, n, cls, rng, device, c=None):
    """n latents through G's (frozen) mapping: z ~ N(0, I), classes per --class unless c is given.

    -> (ws [n, num_ws, w_dim], one-hot classes [n, c_dim] or None)
    """
    z = torch.randn(n, G.z_dim, generator=rng).to(device)
    c = class_labels(G, cls, n, rng) if c is None else c
    c = None if c is None else c.to(device)
    with torch.no_grad():
        return G.mapping(z, c), c


def clip_targets(models, weights, G, src, tgt, images, cls, rng, device):
    """A ClipTarget per CLIP model, computed once per run: the text direction src -> tgt (NADA eq. 2), or, with
    target images, the direction from the generator's images toward theirs."""
    if images:
        with torch.no_grad():
            generated = G.synthesis(draw_ws(G, 16, cls, rng, device)[0])
    pairs = [image_direction(model, [img.to(device) for img in images], generated) if images else
             text_targets(model, src, tgt) for model in models]              # (direction, target embedding) each
    return [ClipTarget(model, weight, *pair) for model, weight, pair in zip(models, weights, pairs)]


def autocast(device, precision):
    """bfloat16 autocast for --precision bf16 on CUDA or the CPU (weights and Adam stay float32); else a no-op."""
    kind = torch.device(device).type
    if precision != "bf16" or kind not in ("cuda", "cpu", "meta"):
        return contextlib.nullcontext()
    return torch.autocast("cpu" if kind == "meta" else kind, torch.bfloat16)   # meta: the dry run's MetaAutocast


def number(t):
    """A scalar tensor's value; 0.0 on the meta device, where the dry run has shapes and no numbers."""
    return 0.0 if t.is_meta else t.item()


def train_step(G_frozen, G, opt, targets, *, layers, batch, mixing, cls, rng, device, precision="fp32",
               consistency=0.0):
    """One step of NADA on a fresh batch. layers: names to train, or k to choose them adaptively this step.
    precision: fp32, or bf16 for the generators' convolutions. consistency: the weight of consistency_loss
    beside each directional loss (0: NADA as published).

    -> (trained layer names, loss, per-CLIP-model losses); on the meta device (the dry run) the losses are 0.0
    """
    ws, c = draw_ws(G_frozen, batch, cls, rng, device)                                # [B, num_ws, w_dim]
    noise = [n.to(device) for n in G.make_noise(batch, generator=rng, device="cpu")]   # the same noise in both
    if mixing > 0 and torch.rand((), generator=rng).item() < mixing:                   # style mixing: later
        cut = int(torch.randint(1, G.num_ws, (), generator=rng))                       # layers from other z
        ws = torch.cat([ws[:, :cut], draw_ws(G_frozen, batch, cls, rng, device, c)[0][:, cut:]], dim=1)
    adaptive = isinstance(layers, int)
    if adaptive:                                        # the k W+ entries that matter most right now
        with autocast(device, precision):
            layers = select_layers_auto(G, draw_ws(G_frozen, SELECTION_BATCH, cls, rng, device)[0], targets, layers,
                                        chunk=batch)   # never more memory than the step itself
    set_trainable(G, layers)
    shared = 0 if adaptive else first_trained_block(G, layers)   # blocks before it never train: render them once
    with torch.no_grad(), autocast(device, precision):
        start = G_frozen.synthesis(ws, noise=noise, stop=shared) if shared else None
        img_frozen = G_frozen.synthesis(ws, noise=noise, start=start)                # [B, 3, H, W]
    with autocast(device, precision):
        img = G.synthesis(ws, noise=noise, start=start)                              # same latents, adapted
    losses = []
    for t in targets:
        with torch.no_grad():
            emb_frozen = encode_images(t.model, img_frozen)                           # [B, D]
        emb = encode_images(t.model, img)
        loss = directional_loss(emb_frozen, emb, t.direction)
        if consistency:
            loss = loss + consistency * consistency_loss(emb_frozen, emb)
        losses.append(t.weight * loss)
    loss = sum(losses)
    if loss.is_meta or torch.isfinite(loss):            # a NaN stops the run (train) before any weight changes
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return layers, number(loss), [number(part) for part in losses]


Training = namedtuple("Training", "G_frozen G opt rng step layers names weights models images memory why")


def prepare(s, device, memory=None, meta=False, generator=None, clip_models=None):
    """Everything a run of settings `s` needs: the frozen base, its trainable copy, the optimizer, the CLIP targets
    and the step; memory: fast or low, else chosen for s.memory. meta: the dry run's twin on the meta device (shapes,
    no data). generator, clip_models: a base and CLIP modules already loaded (study, tests), left unchanged."""
    images = [load_image(p) for p in s.tgt_img]        # read first: a bad image fails before any model loads
    G_frozen = base_generator(s, device, meta, generator, clip_models is None).requires_grad_(False)
    memory, why = (memory, "") if memory else choose_memory(s, device, G_frozen)
    layers = parse_layers(s.layers, G_frozen, s.auto_k)
    names, weights, models = run_clip_models(s, device, memory, meta, clip_models)
    here = "meta" if meta else device
    G = copy.deepcopy(G_frozen)                         # the copy that adapts; G_frozen stays the base
    G.checkpointing = memory == "low"
    opt = torch.optim.Adam([p for n, p in G.named_parameters() if not n.startswith(("style.", "embed."))],
                           lr=s.lr, betas=BETAS)        # the mapping network never trains
    targets = clip_targets(models, weights, G_frozen, s.src, s.tgt, images, s.cls,
                           torch.Generator().manual_seed(s.seed + 1), here)
    for m in models if clip_models is None else ():     # the directions are computed: training reads images only
        drop_text_tower(m)
    rng = torch.Generator().manual_seed(s.seed)         # every random draw of the run, so resume replays exactly
    step = functools.partial(train_step, G_frozen, G, opt, targets, layers=layers, batch=s.batch, mixing=s.mixing,
                             cls=s.cls, rng=rng, device=here, precision=s.precision, consistency=s.consistency)
    return Training(G_frozen, G, opt, rng, step, layers, names, weights, models, images, memory, why)


def train(*, generator=None, clip_models=None, **settings):
    """Adapt a generator from `src` to `tgt` (or toward the images `tgt_img`) -> the run folder.

    settings: the fields of TrainSettings, as keywords: nada.train(src="photo", tgt="sketch", iters=300).
    generator, clip_models: a base generator and CLIP modules already loaded (study, tests); they are not changed.
    The run folder holds generator.pt (the adapted generator), log.jsonl, config.json, samples/ and state.pt (what
    --resume needs). With dry_run: the same setup and two steps on the meta device, nothing downloaded or written
    -> the memory estimate (a dict, see estimate_memory) instead of the folder."""
    s = train_settings(**settings)                      # every setting checked before anything loads
    if s.dry_run:
        return dry_run(s)
    run = RunFolder(s)                                  # checked now; written once everything has loaded
    device = check_device(s.device, s.impl)
    t = prepare(s, device, generator=generator, clip_models=clip_models)
    print(startup_line("train", device, s.impl, *describe_run(s, t, f"memory {t.memory} ({t.why})"), f"out {run.path}"),
          flush=True)
    with run:                                           # its lock; a new run that fails before a save leaves nothing
        start = run.resume(t.G, t.opt, t.rng)
        if start == 0:
            run.preview(t.G_frozen, t.G, 0)
        for step in range(start, s.iters):
            layers, loss, losses = t.step()
            run.log(step, loss, dict(zip(t.names, losses)), layers)             # stops on a NaN loss
            done = step + 1
            if done % s.sample_every == 0 or done == s.iters:
                run.preview(t.G_frozen, t.G, done)
            if done % s.save_every == 0 or done == s.iters or run.stop_signal:
                run.save(t.G, t.opt, t.rng, done, t.names, t.weights)
            if run.stop_signal:                         # Ctrl-C or SIGTERM: saved, now stop
                run.interrupt(done)
    print(f"done: {s.iters - start} steps in {time.time() - run.started:.1f} s, {s.iters} in all; adapted generator: "
          f"{os.path.join(run.path, 'generator.pt')}")
    return run.path


# ----------------------------------------------------------------------------------------------------------
# sample: render a generator (or the base next to the adapted one) at chosen seeds

def seed_latents(G, seeds):
    """One z per seed from NumPy's RandomState(seed), as NVIDIA's generate.py: the same on every machine. [N, z_dim]"""
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(G.z_dim) for s in seeds])).float()


@torch.no_grad()
def sample(ckpt=None, **settings):
    """Render one PNG per seed and a grid.png (or, with walk, an animation) -> the output folder. settings: the other
    fields of SampleSettings, as keywords (seeds or n, trunc, noise_mode, cls, out, compare, also, walk, ...)."""
    s = SampleSettings(ckpt=ckpt, **settings)
    seeds = parse_seeds(checked(s).seeds, s.walk or s.n)
    path, out = sample_paths(s.ckpt, s.out, s.wdir, s.offline, settings=s)
    device = check_device(s.device, s.impl)
    G = named_generator(s.ckpt or path, s.wdir, s.offline, device, s.impl)
    generators = sample_generators(G, path, s, device)  # the columns: base (--compare, --walk), G, --also's
    labels = class_labels(G, s.cls if s.cls is not None else G.meta.get("cls"), len(seeds))   # default: the run's
    make_folder(out)
    print(startup_line("sample", device, s.impl, path, f"{len(seeds)} seeds, truncation {s.trunc}, "
                       f"noise {s.noise_mode}"), flush=True)
    if s.walk:
        return write_walk(generators, seeds, labels, s, device, out)
    rows = [[] for _ in generators]
    for i, seed in enumerate(seeds):
        z = seed_latents(G, [seed]).to(device)
        c = None if labels is None else labels[i:i + 1].to(device)
        ws = generators[0].mapping(z, c, s.trunc)       # compare: the same ws (from the base) for both
        noise = None
        if s.noise_mode == "random":                    # seeded per image, on the CPU: the same on every machine
            noise = [t.to(device) for t in G.make_noise(1, torch.Generator().manual_seed(seed), "cpu")]
        imgs = [g.synthesis(ws, s.noise_mode, noise).cpu() for g in generators]
        save_image(torch.cat(imgs, dim=3), os.path.join(out, f"seed{seed:04d}.png"))
        for row, img in zip(rows, imgs if i < GRID_MAX else ()):   # the grid shows the first seeds
            row.append(img)
    ncol = len(rows[0]) if len(generators) > 1 else math.ceil(math.sqrt(len(rows[0])))
    save_image(make_grid(torch.cat([torch.cat(r) for r in rows]), ncol=ncol), os.path.join(out, "grid.png"))
    print(f"wrote {len(seeds)} images and grid.png to {out}")
    return out


# ==========================================================================================================
# Plumbing: what the method above calls and does not need to show. It crosses the divider through these names
# only: train_settings, checked, parse_seeds and SampleSettings (settings); named_generator, base_generator,
# run_clip_models and load_image (files); RunFolder (a run's folder); dry_run, choose_memory and replay_modes
# (memory); check_device, sample_paths, sample_generators, write_walk, make_folder, save_image, make_grid,
# GRID_MAX, startup_line and describe_run (a command's checks and outputs); load_op (the CUDA kernels). NadaError
# is defined at the top.
# ==========================================================================================================

# ----------------------------------------------------------------------------------------------------------
# settings: every flag once, with its default, its bounds and its help. The command line is built from these
# records, a run records its own in config.json, and --resume and a study's rerun compare them.

MEMORY_MODES, PRECISIONS, NOISE_MODES = ("auto", "fast", "low"), ("fp32", "bf16"), ("const", "random", "none")
EVAL_CLIP = "ViT-L/14"                 # held out: NADA trains with B/32 and B/16 (StyleDomain evaluates so too)
STUDY_DEFAULT_LAYERS = "first:2,last:2,all,auto"
MAX_PROMPT = 1000                      # characters in a prompt
MAX_SEED = 2 ** 32 - 1                 # NumPy's RandomState takes seeds below 2^32 (sample), torch's below 2^64
MAX_IMAGES = 100_000                   # per `sample` call; beyond that, run it again with other --seeds
MAX_FRAMES, MAX_WALK_BYTES = 2000, 1 << 32   # a --walk animation's frames, held in memory until written
GRID_MAX = 64                          # grid.png shows the first 64 seeds (every seed still gets its own PNG)
INVERT_STEPS = 500                     # half in W, half in W+ (README: the reconstruction against the steps)
INVERT_LR = 0.1                        # the projector's rate, ramped up over 5% of each half and down over its last 25%


def setting(default, help=None, kind=None, bounds=None, **cli):
    """One field of a settings record. help: its --help line (None: no flag, Python only). kind: "run" for what
    defines a run (recorded in config.json; a continuation must keep it), "steps" for how long and how often
    (recorded; a continuation may change it), None for this process only. bounds: (lowest, highest or None) of a
    number. cli: argparse's extras (choices, flags)."""
    return dataclasses.field(default=default, metadata=dict(help=help, kind=kind, bounds=bounds, cli=cli))


@dataclasses.dataclass
class Common:                                           # every command's flags: where it runs
    """list the named generators"""
    hidden, helps = (), {}                              # fields that are no flag of this command; other help
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    impl: str = setting("auto", "ops path: auto = CUDA kernels when they build", choices=IMPLS)
    wdir: str = setting(None, "where named weights are kept (default: $NADA_WEIGHTS, else weights/ beside nada.py)",
                        flags=("--weights-dir",))
    offline: bool = setting(False, "never touch the network (also NADA_OFFLINE=1)")
    progress: bool = setting(True)                     # progress bars (the command line shows them on a terminal)


@dataclasses.dataclass
class TrainSettings(Common):
    """adapt a generator from text

    Adapt a pretrained StyleGAN2 generator from --src to --tgt with the directional CLIP loss."""
    src: str = setting("photo", "source prompt", kind="run")
    tgt: str = setting("sketch", "target prompt", kind="run")
    tgt_img: list = setting(None, "target images instead of a target prompt", kind="run", nargs="+")
    ckpt: str = setting("ffhq", "base generator: a file or a name from `nada.py models`", kind="run")
    cls: str = setting(None, "class-conditional generators: NAME, INDEX or all", kind="run", flags=("--class",))
    clip: str = setting("ViT-B/32", "CLIP models, comma-separated names or files", kind="run")
    clip_weights: str = setting(None, "their loss weights, comma-separated (default: 1 each)", kind="run")
    layers: str = setting("auto", "auto | all | last:N | first:N | resolutions like 16,32", kind="run")
    auto_k: int = setting(None, "auto: train the layers of the top K W+ entries (default: all of them)", kind="run")
    batch: int = setting(2, "latents per step", kind="run", bounds=(1, None))
    lr: float = setting(LR, "Adam, betas (0, 0.99^0.8): NADA's effective values", kind="run", bounds=(1e-12, None))
    mixing: float = setting(0.0, "style-mixing probability (0.9 helps shape changes)", kind="run", bounds=(0, 1))
    consistency: float = setting(0.0, "weight of the pairwise-cosine consistency loss that keeps images diverse "
                                 "(HyperDomainNet; 0 = NADA as published)", kind="run", bounds=(0, None))
    seed: int = setting(0, "seeds every random draw; same seed, same run", kind="run", bounds=(0, 2 ** 63 - 4))
    iters: int = setting(300, "training steps", kind="steps", bounds=(1, None))
    sample_every: int = setting(50, "write a preview grid every N steps", kind="steps", bounds=(1, None))
    save_every: int = setting(50, "write generator.pt and state.pt every N steps", kind="steps", bounds=(1, None))
    n_sample: int = setting(4, "preview columns (fixed seeds)", kind="steps", bounds=(1, GRID_MAX))
    out: str = setting(None, "run folder (default: runs/<src>_to_<tgt>)")
    resume: str = setting(None, "continue an interrupted run (its settings are the defaults)", metavar="DIR")
    memory: str = setting("auto", "low: recompute layers in backward, CLIP in float16 on CUDA; auto: low only when "
                          "fast would not fit the GPU", choices=MEMORY_MODES)
    precision: str = setting("fp32", "the generators' arithmetic (bf16: autocast)", choices=PRECISIONS)
    dry_run: bool = setting(False, "estimate the GPU memory (meta device: nothing read, downloaded or written), stop")


@dataclasses.dataclass
class StudySettings(TrainSettings):
    """train and compare several settings

    One run per setting (the product of --layers, --lr and --consistency lists), each evaluated; writes grid.png,
    loss.png, results.md and results.json. Rerun to resume; several GPUs: torchrun --nproc_per_node N nada.py study"""
    layers: str = setting(STUDY_DEFAULT_LAYERS, "settings, comma-separated (resolutions as 16+32)")
    lr: str = setting(f"{LR:g}", "learning rates, comma-separated")
    consistency: str = setting("0", "consistency weights, comma-separated")
    eval_clip: str = setting(EVAL_CLIP, "CLIP models that measure the runs")
    n: int = setting(500, "samples each setting is measured on (under torchrun, which claims --n, write --samples)",
                     bounds=(2, MAX_IMAGES), flags=("--n", "--samples"))
    grid: int = setting(8, "columns of grid.png (its first seeds)", bounds=(1, GRID_MAX))
    trunc: float = setting(1.0, "truncation psi of the measure and the grid", bounds=(-10, 10))
    out: str = setting(None, "study folder (default: studies/<src>_to_<tgt>)")
    hidden = ("sample_every", "save_every", "n_sample", "resume", "dry_run")   # a study sets these for each run
    helps = dict(iters="training steps per setting", seed="the same seed for every setting",
                 clip="CLIP models of the training loss", auto_k="for auto layers: the top K W+ entries")


@dataclasses.dataclass
class EvalSettings(Common):
    """measure an adapted generator with CLIP

    CLIP scores of an adapted generator against its base (clip_score, directional, diversity and the diversity ratio,
    pair similarity); several GPUs: torchrun ... nada.py eval."""
    ckpt: str = setting(None, "a run folder or generator file (default: the newest runs/*)")
    base: str = setting(None, "the base generator, NAME or FILE (default: the one the run recorded)")
    src: str = setting(None, "source prompt (default: the run's)")
    tgt: str = setting(None, "target prompt (default: the run's)")
    clip: str = setting(EVAL_CLIP, "CLIP models, comma-separated; better one that did not train the run")
    n: int = setting(500, "samples (seeds 0..n-1) when --seeds is not given (under torchrun, which claims --n, "
                     "write --samples)", bounds=(1, MAX_IMAGES), flags=("--n", "--samples"))
    seeds: str = setting(None, "e.g. 0-499, drawn exactly as `sample` draws them")
    trunc: float = setting(1.0, "truncation psi (1: the full diversity)", bounds=(-10, 10))
    cls: str = setting(None, "conditional generators (default: the run's)", flags=("--class",))
    batch: int = setting(8, "images per forward pass", bounds=(1, None))
    out: str = setting(None, "the JSON file (default: RUN/eval.json)")


@dataclasses.dataclass
class SampleSettings(Common):
    """render images from a generator"""
    ckpt: str = setting(None, "a file, a run folder or a model name (default: the newest runs/*/generator.pt)")
    n: int = setting(8, "number of images (seeds 0..n-1) when --seeds is not given", bounds=(1, MAX_IMAGES))
    seeds: str = setting(None, "e.g. 0-15 or 1,5,9")
    trunc: float = setting(1.0, "truncation psi toward the average w", bounds=(-10, 10))
    noise_mode: str = setting("const", "const: the checkpoint's stored noise; random: seeded per image",
                              choices=NOISE_MODES)
    cls: str = setting(None, "conditional generators: NAME or INDEX (or all)", flags=("--class",))
    compare: bool = setting(False, "the base too: grid.png's base row above the adapted, each PNG base | adapted")
    also: list = setting(None, "more adapted generators of the same base: a row (a column in PNGs) each", nargs="+",
                         metavar="CKPT")
    walk: int = setting(None, "write an animation instead: a loop through N latents (seeds 0..N-1, or --seeds), the "
                        "base beside the adapted", bounds=(2, 1000), metavar="N")
    frames: int = setting(24, "--walk: frames from one latent to the next", bounds=(1, 1000))
    fps: int = setting(24, "--walk: frames per second", bounds=(1, 100))
    format: str = setting("webp", "--walk: the animation's format", choices=("webp", "gif"))
    out: str = setting(None, "output folder (default: RUN/sample or samples/<ckpt>)")


@dataclasses.dataclass
class InvertSettings(Common):
    """find photos' latents in a generator

    Optimise each photo's latent (W, then W+) and noise maps, --steps in all, so that the generator renders it
    (StyleGAN2's projector).
    Photos are resized and centre-cropped to the generator's size. Face generators (ffhq, metfaces) expect faces
    aligned as FFHQ's: eyes level and centred, the face filling the middle of the frame; nada does not align them."""
    img: list = setting(None, "photos (PNG, JPEG, WebP, ...)", nargs="+")
    ckpt: str = setting("ffhq", "the generator: a file or a name from `nada.py models`")
    steps: int = setting(INVERT_STEPS, "optimisation steps, half in W, half in W+", bounds=(2, 100_000))
    lr: float = setting(INVERT_LR, "Adam's rate (ramped up, then down)", bounds=(1e-12, None))
    lpips: str = setting("auto", "perceptual loss: auto (LPIPS on VGG16, downloaded once), off (pixel loss alone), "
                         "or a FILE")
    seed: int = setting(0, "seeds the noise maps and the jitter of w", bounds=(0, 2 ** 63 - 4))
    batch: int = setting(1, "photos optimised together", bounds=(1, 64))
    out: str = setting("inversions", "output folder: STEM.latent.pt and STEM.recon.png per photo")
    dry_run: bool = setting(False, "estimate the GPU memory of an inversion (meta device: nothing read or written)")


@dataclasses.dataclass
class EditSettings(InvertSettings):
    """render photos with adapted generators

    Invert each photo into the runs' base (or reuse its STEM.latent.pt in --out, made from the same bytes and base
    with the same --lpips and at least --steps steps) and render the latent with every run: STEM.<run>.png each, and
    STEM.edit.png: input | reconstruction | runs."""
    ckpt: list = setting(None, "adapted generators of one base: run folders or files", nargs="+", metavar="RUN")
    base: str = setting(None, "their base, NAME or FILE (default: the one the runs recorded)")
    latents: list = setting(None, "saved latents (STEM.latent.pt) to render instead of photos", nargs="+",
                            metavar="FILE")
    pti: int = setting(0, "pivotal tuning: steps that tune a copy of the base to each photo first (0: off)",
                       bounds=(0, 100_000))
    out: str = setting("inversions", "output folder (where `invert` writes too)")
    hidden = ("dry_run",)


@dataclasses.dataclass
class DoctorSettings(Common):
    """check the environment"""
    build_ops: bool = setting(False, "compile the CUDA ops now (no GPU needed)")


def checked(s):
    """A settings record, every field checked against its choices and its bounds (NaN and infinities refused) -> s."""
    for f in dataclasses.fields(s):
        value, flag = getattr(s, f.name), "--" + f.name.replace("_", "-")
        choices = f.metadata["cli"].get("choices")
        if choices and value not in choices:
            raise NadaError(f"{flag} {value!r}: use one of {', '.join(choices)}")
        if f.metadata["bounds"] and value is not None:
            check_number(flag, value, *f.metadata["bounds"])
    return s


def check_number(flag, value, lo, hi=None):
    if isinstance(value, float) and not math.isfinite(value):
        raise NadaError(f"{flag} {value}: must be a finite number")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise NadaError(f"{flag} {value}: must be {bound}")


def recorded_fields(kinds=("run", "steps")):
    """The TrainSettings fields a run records in config.json (of these kinds)."""
    return [f for f in dataclasses.fields(TrainSettings) if f.metadata["kind"] in kinds]


def train_settings(**kw):
    """A run's settings (TrainSettings' fields), checked before anything is loaded or written. With resume, what is
    not given comes from the run's config.json, and what defines the run must not change. Files become absolute
    paths, so that a run resumes from any folder."""
    recorded = run_settings(kw["resume"]) if kw.get("resume") else {}
    s = TrainSettings(**{**recorded, **kw})
    absolute = lambda p: os.path.abspath(p) if os.path.isfile(p) else p   # a file; a model's name stays a name
    s.tgt_img = [os.path.abspath(p) for p in s.tgt_img or []]
    s.ckpt, s.clip = absolute(s.ckpt), ",".join(absolute(n.strip()) for n in str(s.clip).split(","))
    missing = [p for p in s.tgt_img if not os.path.isfile(p)]
    if missing:
        raise NadaError(f"--tgt-img: no such file: {missing[0]}")
    if not s.tgt_img:
        check_prompts(s.src, s.tgt)
    if s.consistency and s.batch < 2:
        raise NadaError("--consistency compares the images of a batch with each other: it needs --batch 2 or more")
    parse_clip(s.clip, s.clip_weights)
    checked(s)
    changed = recorded and changed_setting(recorded, s)
    if changed:
        raise NadaError(f"--resume {s.resume}: the run used {changed}; resume with the same settings or start a new "
                        "--out")
    return s


def run_settings(run):
    """The settings a run was started with (its config.json); one clear error if `run` is not a run folder."""
    if not all(os.path.isfile(os.path.join(run, f)) for f in ("state.pt", "config.json")):
        raise NadaError(f"--resume {run}: no interrupted run there (needs config.json and state.pt)")
    cfg = run_config(run)
    if cfg is None:
        raise NadaError(f"--resume {run}: config.json is unreadable; start a new --out")
    return cfg


def run_config(folder):
    """The recorded settings of a run folder (config.json; what an older run did not record takes today's default,
    as --consistency, 0, did before it existed), or None if that file is damaged or a value has the wrong type."""
    cfg = read_json(os.path.join(folder, "config.json"))
    cfg = {f.name: cfg.get(f.name, f.default) for f in recorded_fields()} if cfg else None
    return cfg if cfg and all(_of_type(cfg[f.name], f) for f in recorded_fields()) else None


def _of_type(value, f):
    """Whether a value read from a file fits a settings field: None where the default is None; a list of strings for
    a list; numbers of the annotated kind (an int is a float too). nada.train also takes the class as an index, and
    the clip weights as a list of numbers."""
    if value is None:
        return f.default is None
    if f.name == "clip_weights" and isinstance(value, list):
        return all(type(w) in (int, float) for w in value)
    if f.type is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if f.type is float or f.name == "cls":
        return type(value) in ((int, float) if f.type is float else (int, str))
    return type(value) is f.type


def changed_setting(old, new):
    """'--flag old, not new' for the first setting that defines a run (old: recorded) and `new` changes, else None."""
    for f in recorded_fields(("run",)):
        if old[f.name] != getattr(new, f.name):
            return f"--{f.name.replace('_', '-')} {old[f.name]!r}, not {getattr(new, f.name)!r}"
    return None


def check_prompts(src, tgt):
    """Two prompts that differ; each short enough to tokenize (CLIP's tokenizer is slow on long words, and 77 tokens
    hold far fewer than MAX_PROMPT characters)."""
    for text in (src, tgt):
        if len(text or "") > MAX_PROMPT:
            raise NadaError(f"the prompt {text[:40]!r}... does not fit CLIP's 77 tokens in every template: shorten it")
    if not (src or "").strip() or not (tgt or "").strip():
        raise NadaError("--src and --tgt must both be non-empty prompts, e.g. --src photo --tgt \"pencil sketch\"")
    if src.strip().lower() == tgt.strip().lower():
        raise NadaError(f"--src and --tgt are the same ({src!r}): there is no direction to move in")


def check_device(device, impl="auto", here=True):
    """--device and --impl -> the device, or one clear error: no such GPU, or CUDA kernels asked for but unusable.
    here=False (the dry run, which estimates for a device that need not be here): only the name is checked."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        device = "cuda" if count else "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device != "cpu" and not m:
        raise NadaError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not here:
        return device
    if m and int(m.group(1) or 0) >= count:
        raise NadaError(f"--device {device}, but torch sees {count} CUDA device{'s' * (count != 1)} (use --device "
                        "cpu, or check `python nada.py doctor`)")
    if impl == "cuda" and device == "cpu":
        raise NadaError("--impl cuda runs the CUDA kernels, which need --device cuda; use --impl auto or ref on the "
                        "CPU")
    for op in OPS if impl == "cuda" else ():
        if load_op(op)[0] is None:
            raise NadaError(f"--impl cuda, but the CUDA {op} op is unavailable ({load_op(op)[1]}); use --impl auto")
    return device


def parse_seeds(spec, n=None):
    """--seeds '0-15' or '1,5,9' (or a mix) -> [int], each a seed NumPy takes, at most MAX_IMAGES of them; no --seeds:
    0..n-1."""
    if spec is None:
        return list(range(n))
    ranges = []
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise NadaError(f"--seeds {spec!r}: use a range like 0-15 or a list like 1,5,9")
        ranges.append(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    if max(r[-1] for r in ranges) > MAX_SEED or sum(len(r) for r in ranges) > MAX_IMAGES:
        raise NadaError(f"--seeds {spec!r}: seeds go up to {MAX_SEED}, and one call renders at most {MAX_IMAGES} "
                        "images")
    return [s for r in ranges for s in r]


# ----------------------------------------------------------------------------------------------------------
# checkpoint files: rosinality .pt, NVIDIA .pkl, CLIP's TorchScript archives and our own, read as data
#
# Every file is untrusted. Nothing in it runs (allow-listed globals resolve to stand-ins that hold data), and nothing
# it claims is believed before it is checked against the bytes there: lengths against the bytes left, a zip's
# records against the file's size before they inflate, tensors against their storage and the architecture, trees
# walked once, bounded in depth and size. A load ends in a model or one NadaError, and builds no more than the file
# holds (test_nada.py fuzzes this); tensors stay references until the part a caller uses is known.

LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
MAX_MODULES, MAX_DEPTH = 4096, 32      # a module tree in a file: a 1024 px G_ema has 60 modules 5 deep, CLIP < 1000
ZIP_SLACK = 1 << 24                    # what a zip's compressed records (TorchScript code) may inflate beyond the file
TRUNCATED = "the file ends early: it is truncated or damaged; download it again"
MAX_JSON = 1 << 26                     # bytes of a JSON file nada reads back
MAX_PIXELS, CODE_MAX = 1 << 26, 1 << 22   # an image's pixels (8192^2), a TorchScript code record's bytes


def load_generator(path, device="cpu", impl="auto"):
    """Load a StyleGAN2 generator from any supported checkpoint file -> Generator in eval mode."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NadaError(f"{path}: no such file")
    with open(path, "rb") as f:                         # torch.save: a zip, or a stream that starts with a magic number
        torch_saved = f.read(len(LEGACY_TORCH_MAGIC)).startswith((b"PK\x03\x04", LEGACY_TORCH_MAGIC))
    sd, config, latent_avg, meta = (read_torch_checkpoint if torch_saved else read_nvidia_pickle)(path)
    G = _fit(path, sd, config)
    if latent_avg is None:                              # old files without it: the mean w of many seeded z
        with torch.no_grad():
            z = torch.randn(4096, G.z_dim, generator=torch.Generator().manual_seed(0))
            c = F.one_hot(torch.arange(4096) % G.c_dim, G.c_dim) if G.c_dim else None
            latent_avg = G.mapping(z, c)[:, 0].mean(0)
    if not isinstance(latent_avg, torch.Tensor) or latent_avg.numel() != G.w_dim or not latent_avg.isfinite().all():
        raise NadaError(f"{path}: latent_avg is not a vector of {G.w_dim} numbers")
    G.latent_avg, G.meta = latent_avg.float().reshape(G.w_dim).clone(), meta   # meta: what our checkpoints record
    return G.set_impl(impl).requires_grad_(True).to(device)


def _fit(path, sd, config):
    """A Generator holding the tensors of `sd` as float32 weights of their own (no two share memory), made only once
    every tensor fits the architecture and its storage."""
    dims = [config["size"], config["style_dim"], config["z_dim"], config["n_mlp"], *config["channels"].values()]
    if not all(0 < d <= 1 << 16 for d in dims) or not 0 <= config["c_dim"] <= 1 << 16:
        raise NadaError(f"{path}: its tensors imply dimensions {dims} (each must be 1 to 65536); the file is damaged")
    try:                                                # on the meta device: no memory, no random init
        with torch.device("meta"):
            G = Generator(**config, impl="ref")
    except (ValueError, TypeError, RuntimeError) as e:
        raise NadaError(f"{path}: the tensors do not fit a StyleGAN2 generator: {_first_line(e)}") from None
    want = G.state_dict()
    wrong = [k for k in want if k not in sd or sd[k].shape != want[k].shape or not sd[k].is_floating_point()]
    if wrong or sd.keys() - want.keys():
        k = (wrong or sorted(sd.keys() - want.keys()))[0]
        got, need = (f"{tuple(d[k].shape)} {d[k].dtype}" if k in d else "none" for d in (sd, want))
        raise NadaError(f"{path}: the tensors do not fit a StyleGAN2 generator ({k[:80]} is {got}; the architecture "
                        f"needs {need})")
    _check_storage(path, sd, os.path.getsize(path))
    if not all(torch.isfinite(v).all() for v in sd.values()):
        raise NadaError(f"{path}: its weights hold NaN or infinity; the file is damaged (or a run that exploded)")
    weights, taken = {}, set()                          # a float32 tensor that alone spans a storage nothing else has
    for k, v in sd.items():                             # taken becomes the weight as it is; the others are copies
        storage = v.untyped_storage()
        whole = v.dtype == torch.float32 and v.is_contiguous() and v.storage_offset() == 0 and \
            v.numel() * 4 == storage.nbytes()
        weights[k] = v if whole and storage.data_ptr() not in taken else v.to(torch.float32, copy=True)
        taken.add(storage.data_ptr())
    G.load_state_dict(weights, strict=True, assign=True)
    return G


def _check_storage(path, tensors, budget):
    """What a load builds never exceeds the file's size: each tensor is within its storage (_view), but views of one
    storage may each be copied, so together they may not show more bytes than the file holds."""
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    if total > budget:
        raise NadaError(f"{path}: its tensors show {total} bytes in all, more than are stored in a file of {budget}; "
                        "it is damaged")


def _refusal(e):
    """Why a file could not be read, in words."""
    return TRUNCATED if isinstance(e, (EOFError, zipfile.BadZipFile, zlib.error)) else _first_line(e)


def _first_line(e):
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] if lines else type(e).__name__


def read_torch_checkpoint(path):
    """-> (rosinality state dict, Generator kwargs, latent_avg or None, our metadata or {}) from a torch.save file;
    only the generator's tensors are read."""
    try:
        with TorchFile(path) as tf:
            if tf.archive:
                raise _Refused("it is a TorchScript archive (a CLIP model?), not a state dict")
            ckpt = tf.load()
            if isinstance(ckpt, dict) and "g_ema" in ckpt:
                sd, meta, latent_avg = ckpt["g_ema"], ckpt.get("nada"), ckpt.get("latent_avg")
            elif isinstance(ckpt, dict) and "style.1.weight" in ckpt:
                sd, meta, latent_avg = ckpt, {}, None
            else:
                found = [k[:40] for k in ckpt if isinstance(k, str)][:8] if isinstance(ckpt, dict) else \
                    type(ckpt).__name__
                raise NadaError(f"{path}: no generator found (expected a 'g_ema' state dict; found {found})")
            sd, latent_avg = tf.build(sd), tf.build(latent_avg)
    except NadaError:
        raise
    except Exception as e:
        raise NadaError(f"{path}: refused or unreadable torch checkpoint: {_refusal(e)}") from None
    if not (isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())):
        raise NadaError(f"{path}: 'g_ema' is not a state dict of tensors")
    meta = meta if isinstance(meta, dict) else {}
    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if not isinstance(meta.get("base", ""), str):
        raise NadaError(f"{path}: the recorded base generator is a {type(meta['base']).__name__}, not a file name")
    kinds = dict(src=str, tgt=str, layers=str, cls=(str, int, type(None)), iterations=int, seed=int, clip=list,
                 clip_weights=list, tgt_img=(list, type(None)), consistency=(int, float))
    items = dict(clip=(str,), tgt_img=(str,), clip_weights=(int, float))
    for k, kind in kinds.items():                       # what nada recorded, as nada records it
        if k in meta and not isinstance(meta[k], kind) or not all(type(x) in items.get(k, ()) for x in (
                meta[k] if isinstance(meta.get(k), list) else [])):
            raise NadaError(f"{path}: its recorded {k} is a {type(meta[k]).__name__} that nada never writes; the "
                            "file is damaged")
    config = dict(_infer_config(path, sd), **{k: _setting(path, k, saved[k], k == "conv_clamp")
                                             for k in ("lr_mlp", "conv_clamp") if k in saved})
    return sd, config, latent_avg, meta


def _setting(path, name, value, none_ok=False):
    """A number the architecture takes from a file (a gain, a clamp): finite and positive, or refused."""
    if value is None and none_ok:
        return None
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and 0 < value < math.inf:
        return value
    shown = repr(value) if isinstance(value, (int, float, np.number)) else f"a {type(value).__name__}"
    raise NadaError(f"{path}: the saved setting {name} is {shown}, where a positive number belongs; the file is "
                    "damaged")


def _infer_config(path, sd):
    """Architecture from rosinality tensor shapes: nothing is assumed about widths or mapping depth."""
    try:
        n_mlp = sum(1 for k in sd if re.fullmatch(r"style\.\d+\.weight", k))
        style_dim, in0 = sd["style.1.weight"].shape
        embed_dim, c_dim = sd["embed.weight"].shape if "embed.weight" in sd else (0, 0)
        n_rgb = sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k))
        if not 1 <= n_rgb <= 14:                        # 8 px to 65536 px
            raise KeyError(f"{n_rgb} toRGB layers")
        channels = {4: sd["input.input"].shape[1], **{2 ** (j + 3): sd[f"convs.{2 * j}.conv.weight"].shape[1]
                                                      for j in range(n_rgb)}}
    except (KeyError, ValueError, IndexError) as e:
        raise NadaError(f"{path}: not a StyleGAN2 generator state dict (missing or malformed {e})") from None
    return dict(size=2 ** (n_rgb + 2), style_dim=style_dim, n_mlp=n_mlp, channels=channels, z_dim=in0 - embed_dim,
                c_dim=c_dim, embed_dim=embed_dim or None, lr_mlp=0.01, conv_clamp=None)


# An NVIDIA network pickle holds G, D and G_ema as `persistent_class` objects whose source code is in the file.
# We never run it: an allow-listing unpickler turns each object into its pickled state, and large byte strings
# (the tensors' storages) stay on disk as (offset, size) until we know which ones G_ema needs. Each storage is
# itself a small legacy torch.save, read by the same unpickler. TorchScript archives (CLIP) are read likewise.

BLOB_MIN = 1 << 20                     # pickle writes payloads this big outside its frames; no name or text is as long
_Blob = namedtuple("_Blob", "f offset size")                 # a large byte string of the pickle, left on disk
_TensorRef = namedtuple("_TensorRef", "storage args")       # a tensor not built yet: _rebuild_tensor_v2's arguments
_Storage = namedtuple("_Storage", "key dtype numel")         # a storage of a torch.save file, not read yet
STORAGE_DTYPES = {f"{n}Storage": getattr(torch, d) for n, d in (
    ("Float", "float32"), ("Half", "float16"), ("BFloat16", "bfloat16"), ("Double", "float64"), ("Long", "int64"),
    ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool"))}


class _Refused(pickle.UnpicklingError):
    """A file we will not read; the message says why in words."""


class _Persistent:
    """Stands in for an NVIDIA `persistent_class` object: keeps its pickled state, never runs its source."""

    def __init__(self, meta):
        if not (isinstance(meta, dict) and isinstance(meta.get("state"), dict) and _is_name(meta.get("class_name"))):
            raise _Refused("a persistent object without a class name and state")
        self.class_name, self.state = meta["class_name"], meta["state"]

    def __setstate__(self, state):                      # pickle's BUILD would overwrite what __init__ checked
        raise _Refused("a persistent object is modified after it was made")


class _ScriptObject:
    """Stands in for a class a TorchScript archive names (`__torch__.…`): keeps the pickled attributes and never
    runs the class's code (a scripted __setstate__ is code, and torch.jit.load runs it)."""
    state = None

    def __setstate__(self, state):
        self.state = state


def _is_name(x):
    return isinstance(x, str) and re.fullmatch(r"[\w-]{1,64}", x) is not None


class _PickleFile:
    """A pickle's file that never reads past its end. Pickle allocates what a length field claims before it reads (a
    13-byte file can ask for 6 GB), so every read is checked against the bytes left first. lazy: reads of BLOB_MIN
    bytes or more return a _Blob and skip them (the tensors' bytes stay on disk until they are needed)."""

    def __init__(self, f, lazy=False):
        self.f, self.lazy, self.readline = f, lazy, f.readline
        here = f.tell()
        self.size = f.seek(0, 2)
        f.seek(here)

    def left(self):
        return self.size - self.f.tell()

    def read(self, n):
        if not 0 <= n <= self.left():
            raise EOFError(TRUNCATED)
        if not self.lazy or n < BLOB_MIN:
            return self.f.read(n)
        blob = _Blob(self.f, self.f.tell(), n)
        self.f.seek(n, 1)
        return blob


class _SafeUnpickler(pickle._Unpickler):
    """Python's own unpickler (not the C one, whose reads the _PickleFile could not check), restricted: only
    allow-listed globals resolve, and only plain values (str, bytes, numbers, None) are hashed as dictionary keys or
    set items, since hashing a tuple nested through shared references takes exponential time."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, src, allowed, storage=None, scripted=False):
        super().__init__(src)
        self.src, self.allowed, self.storage, self.scripted = src, allowed, storage, scripted

    def left(self):
        """The bytes left: in the file, and in the frame being read."""
        frame = self._unframer.current_frame
        return self.src.left() + (frame.getbuffer().nbytes - frame.tell() if frame else 0)

    def find_class(self, module, name):
        """An allow-listed global's stand-in; with scripted (TorchScript archives), a class the archive defines
        (`__torch__.…`) becomes an inert _ScriptObject type."""
        if self.scripted and module.split(".")[0] == "__torch__" and _is_name(name) and len(module) < 200:
            return type(name, (_ScriptObject,), {"qualname": f"{module}.{name}"})
        if (module, name) == ("dnnlib.tflib.network", "Network"):
            raise _Refused("this is a TensorFlow StyleGAN pickle; convert it to PyTorch first "
                           "(stylegan2-ada-pytorch's legacy.py), or use the PyTorch release")
        if (module, name) not in self.allowed:
            raise _Refused(f"it asks for {f'{module}.{name}'[:100]}, which is not checkpoint data (refused; nothing "
                           "ran)")
        return self.allowed[(module, name)]

    def persistent_load(self, pid):
        if self.storage is None:
            raise _Refused("it refers to data outside the pickle")
        return self.storage(pid)

    def load_setitem(self):                             # the stack ends: dict, key, value
        _plain(self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):                            # the stack since the mark: key, value, key, value, ...
        _plain(self.stack[::2])
        pickle._Unpickler.load_setitems(self)
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        _plain(self.stack[::2])
        pickle._Unpickler.load_dict(self)
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):                            # the stack since the mark: a set's items
        _plain(self.stack)
        pickle._Unpickler.load_additems(self)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        _plain(self.stack)
        pickle._Unpickler.load_frozenset(self)
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_build(self):                               # the stack ends: object, state. Never set the state of a
        if any(self.stack[-2] is v for v in self.allowed.values()):   # stand-in itself: it serves the next file too
            raise _Refused("it sets the state of a class or function it names; checkpoints never do")
        pickle._Unpickler.load_build(self)
    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self):                          # pickle's own makes the array before it reads the bytes
        self.append(bytearray(self.read(int.from_bytes(self.read(8), "little"))))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _plain(items):
    """Refuse dictionary keys or set items other than strings, bytes, None and small integers: hashing a tuple nested
    through shared references takes exponential time, and large numbers can be made to share a hash (each key then
    costs a pass over all the others). Checkpoints use no other keys."""
    if not all(type(k) in (str, bytes, type(None)) or type(k) is int and abs(k) < 1 << 31 for k in items):
        raise _Refused("it uses a container or a large number as a dictionary key or set item; checkpoints never do")
    return items


def _unpickle(src, allowed, storage=None, scripted=False):
    """One restricted pickle from `src` (a _PickleFile). Python's unpickler reports a damaged file as EOFError, a
    bare opcode number or 'pop from empty list'; this says in words what is wrong."""
    u = _SafeUnpickler(src, allowed, storage, scripted)
    try:
        return u.load()
    except _Refused:
        raise
    except Exception as e:
        if isinstance(e, EOFError) or u.left() <= 0:
            raise _Refused(TRUNCATED) from None
        raise _Refused("the file is damaged, or not a checkpoint: its pickle stream makes no sense; download it "
                       "again") from None


def _torch_globals(nvidia=False):
    """The globals a torch.save file may name (tensors, their storages' types, OrderedDict, the argparse.Namespace of
    rosinality's training checkpoints) and, with nvidia, those an NVIDIA network pickle adds (torch_utils.persistence
    objects and what its training writes), mapped to stand-ins that only hold data."""
    as_data = lambda data, *args: data                  # requires_grad and hooks do not matter here
    allowed = {("torch._utils", "_rebuild_tensor_v2"): lambda storage, *args: _TensorRef(storage, args),
               ("torch._utils", "_rebuild_parameter"): as_data,
               ("torch._utils", "_rebuild_parameter_with_state"): as_data,
               ("collections", "OrderedDict"): _ordered_dict, ("argparse", "Namespace"): type("Namespace", (), {}),
               **{("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()}}
    if nvidia:
        import importlib
        scalar = importlib.import_module(f"numpy.{'_core' if hasattr(np, '_core') else 'core'}.multiarray").scalar
        allowed.update({("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
                        ("dnnlib.util", "EasyDict"): type("EasyDict", (dict,), {}), ("builtins", "set"): _set,
                        ("numpy", "dtype"): np.dtype, ("torch.storage", "_load_from_bytes"): lambda b: b,
                        ("numpy.core.multiarray", "scalar"): scalar, ("numpy._core.multiarray", "scalar"): scalar})
    return allowed


def _ordered_dict(pairs=()):
    """An OrderedDict as pickled: empty, then filled by SETITEMS (which checks keys), or, in files of 2017-2018
    (torchvision's VGG16, LPIPS's calibration), made from a list of [key, value] pairs."""
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise _Refused("an OrderedDict made from something other than key-value pairs; the file is damaged")
    return OrderedDict(zip(_plain([p[0] for p in pairs]), (p[1] for p in pairs)))


_set = lambda items=(): set(_plain(items))             # protocol <= 3 pickles make sets from a list


class TorchFile:
    """A file torch.save or torch.jit.save wrote (a path, or its bytes), read as data and never run. Since torch 1.6 a
    zip: <root>/data.pkl pickles the object and <root>/data/<key> holds each storage's bytes (TorchScript archives
    add <root>/code/); before, a stream: pickles of a magic number, a version, system info, the object and the
    storage keys, then each storage's bytes after its 8-byte element count. load() unpickles the object with its
    tensors left _TensorRefs; build(part) reads the tensors of the part a caller uses."""

    def __init__(self, source):
        if not isinstance(source, (bytes, bytearray)) and not os.path.isfile(source):
            raise _Refused("it is not a regular file")   # a FIFO or a device would block the read
        self.f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
        self.size, self.zip, self.archive = self.f.seek(0, 2), None, False
        self.refs, self.offsets, self.storages = {}, {}, {}   # storage key -> _Storage, stream offset, 1-D tensor
        self.f.seek(0)
        head = self.f.read(len(LEGACY_TORCH_MAGIC))
        if head.startswith(b"PK\x03\x04"):
            self.check_zip()
        elif not head.startswith(LEGACY_TORCH_MAGIC[:2]):   # a stream's first pickle (protocol 2) is its magic number
            raise _Refused("it is neither a TorchScript archive nor a torch.save'd state dict")
        elif not isinstance(source, (bytes, bytearray)) and zipfile.is_zipfile(self.f):
            raise _Refused("it is a pre-1.6 torch.save stream and a zip at once; a file in two formats is refused")
        self.f.seek(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def check_zip(self):
        """Check every record before any is read: one root folder; no name twice (zipfile would read one, a check the
        other); stored as it is (torch compresses nothing but TorchScript's code, and a compressed record can inflate
        without bound before its CRC fails); and no declared size, nor all together, beyond the file."""
        try:
            self.zip = zipfile.ZipFile(self.f)
        except zipfile.BadZipFile:
            raise EOFError(TRUNCATED) from None         # its directory comes last: a cut zip has none
        names = self.zip.namelist()
        self.root = names[0].split("/")[0] if names else ""
        if len(set(names)) != len(names) or not all(n.startswith(self.root + "/") for n in names):
            raise _Refused("a zip whose records repeat a name or lie outside one folder; the file is damaged or "
                           "made to mislead")
        for i in self.zip.infolist():
            if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED if "/code/" in i.filename else 0):
                raise _Refused(f"its record {i.filename[:80]} is compressed, and could inflate without bound; torch "
                               "stores its records as they are")
        sizes = [i.file_size for i in self.zip.infolist()]
        if max(sizes) > self.size or sum(sizes) > self.size + ZIP_SLACK:
            raise _Refused(f"its records inflate to {sum(sizes)} bytes from a file of {self.size} (a compression "
                           "bomb?); torch stores its records as they are")
        if f"{self.root}/data.pkl" not in names:
            raise _Refused("a zip file, but not a torch checkpoint (no data.pkl); the file is damaged")
        if f"{self.root}/byteorder" in names and self.record("byteorder", most=16) != b"little":
            raise _Refused("its tensors are stored big-endian; nada reads little-endian files only")
        self.archive = any(n.startswith(f"{self.root}/code/") for n in names)

    def record(self, name, size=None, most=None):
        """A zip record's bytes; `size`: the exact size it must have, `most`: at most, checked before it is inflated."""
        info = self.zip.getinfo(f"{self.root}/{name}")
        if (size is not None and info.file_size != size) or (most is not None and info.file_size > most):
            raise _Refused(f"its record {name[:80]} has {info.file_size} bytes, not what it should; the file is "
                           "damaged")
        with self.zip.open(info) as f:                  # reads at most what the record declares, inflated or not
            data = f.read(info.file_size + 1)
        if len(data) != info.file_size:
            raise _Refused(f"its record {name[:80]} is not the size it declares; the file is damaged")
        return data

    def load(self, scripted=False):
        """The pickled object, its tensors _TensorRefs (their storages _Storage names, not read yet)."""
        if self.zip:
            return _unpickle(_PickleFile(io.BytesIO(self.record("data.pkl"))), _torch_globals(), self.name, scripted)
        src = _PickleFile(self.f)
        magic, version, info = (_unpickle(src, {}) for _ in range(3))
        if (magic, version) != (0x1950A86A20F9469CFC6C, 1001) or not isinstance(info, dict) or not info.get(
                "little_endian"):
            raise _Refused("it is not stored as torch.save stores data; the file is damaged")
        obj = _unpickle(src, _torch_globals(), self.name, scripted)
        keys = _unpickle(src, {})
        if not (isinstance(keys, list) and all(type(k) is str for k in keys) and sorted(keys) == sorted(self.refs)):
            raise _Refused("its list of tensor storages is malformed; the file is damaged")
        for key in keys:                                # each storage: its element count, then its bytes
            ref, here = self.refs[key], self.f.tell() + 8
            if int.from_bytes(src.read(8), "little") != ref.numel or ref.numel * ref.dtype.itemsize > src.left():
                raise EOFError(TRUNCATED)
            self.offsets[key] = here
            self.f.seek(ref.numel * ref.dtype.itemsize, 1)
        return obj

    def name(self, pid):
        """A persistent id ('storage', storage type, key, location, numel[, view]) -> the _Storage it names."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and pid[5:] in ((), (None,))
                and isinstance(pid[1], torch.dtype) and _is_name(pid[2]) and type(pid[4]) is int
                and 0 <= pid[4] * pid[1].itemsize <= self.size):
            raise _Refused("a tensor whose storage is not a record of the file; the file is damaged")
        ref = self.refs.setdefault(pid[2], _Storage(pid[2], pid[1], pid[4]))
        if ref != (pid[2], pid[1], pid[4]):
            raise _Refused("one storage named with two sizes or types; the file is damaged")
        return ref

    def storage(self, ref):
        """A _Storage's elements as a 1-D tensor, read once."""
        if ref.key not in self.storages:
            nbytes = ref.numel * ref.dtype.itemsize
            if self.zip:
                data = self.record(f"data/{ref.key}", nbytes)
            else:
                self.f.seek(self.offsets[ref.key])
                data = self.f.read(nbytes)
            self.storages[ref.key] = torch.frombuffer(bytearray(data), dtype=ref.dtype) if nbytes else \
                torch.zeros(0, dtype=ref.dtype)             # in memory of its own
        return self.storages[ref.key]

    def build(self, part):
        """`part` of the loaded object with each _TensorRef made a tensor; a container shared in it is built once."""
        self.built = {}
        return self._build(part, 0)

    def _build(self, x, depth):
        if isinstance(x, (_TensorRef, _Storage)):
            return _view(self.storage(x.storage), *x.args[:3]) if isinstance(x, _TensorRef) else self.storage(x)
        if not isinstance(x, (dict, list, tuple)):
            return x
        if depth > MAX_DEPTH:                           # a cycle, too, ends here
            raise _Refused(f"it nests containers deeper than {MAX_DEPTH}; checkpoints never do")
        if id(x) not in self.built:
            items = {k: self._build(v, depth + 1) for k, v in (x.items() if isinstance(x, dict) else enumerate(x))}
            self.built[id(x)] = items if isinstance(x, dict) else type(x)(items.values())
        return self.built[id(x)]


def _view(base, offset, size, stride):
    """A tensor over a storage's elements (`base`, 1-D), refused if it would show more elements than the storage
    holds (a stride-0 view of a huge size) or reach outside it."""
    size, stride = torch.Size(size), torch.Size(stride)                # ints only
    if not (isinstance(base, torch.Tensor) and type(offset) is int and size.numel() <= base.numel()):
        raise _Refused("a tensor claims more data than its storage holds; the file is damaged")
    return base.as_strided(size, stride, offset)        # raises if it reaches outside the storage


def _legacy_storage(raw):
    """The one storage in `raw` (bytes, or a _Blob the pickle left on disk), a pre-1.6 torch.save of a storage, as
    NVIDIA pickles nest one per tensor."""
    if isinstance(raw, _Blob):                          # its size was checked against the file when it was read
        raw.f.seek(raw.offset)
        raw = raw.f.read(raw.size)
    if not isinstance(raw, bytes):
        raise _Refused("a tensor without stored bytes; the file is damaged")
    with TorchFile(raw) as tf:
        ref = tf.load()
        if not isinstance(ref, _Storage):
            raise _Refused("a tensor's storage record is malformed; the file is damaged")
        return tf.storage(ref)


def _modules(root, children):
    """[(name prefix, module)] of a pickled module tree, parents first. A file may make a 'tree' whose subtrees
    are shared (a DAG: walked as a tree, exponential) or cyclic, or deep: refused, with the depth and size bounded."""
    seen, out, todo = set(), [], [("", root, 0)]
    while todo:
        prefix, m, depth = todo.pop()
        if id(m) in seen:
            raise _Refused(f"module {prefix[:-1][:80]} appears twice in the module tree; a saved network never does")
        if depth > MAX_DEPTH or len(seen) >= MAX_MODULES:
            raise _Refused(f"its module tree is deeper than {MAX_DEPTH} or larger than {MAX_MODULES} modules")
        seen.add(id(m))
        out.append((prefix, m))
        for name, child in reversed(list(children(m))):
            if not _is_name(name):
                raise _Refused("a module name that is not a short identifier")
            todo.append((f"{prefix}{name}.", child, depth + 1))
    return out


def _nvidia_children(m):
    kids = m.state.get("_modules", {})
    return [(k, v) for k, v in kids.items() if isinstance(v, _Persistent)] if isinstance(kids, dict) else []


def read_g_ema(path):
    """The pickled G_ema module tree of an NVIDIA network pickle, with its tensors built and no others: G's and D's
    are never read from disk, so memory holds one generator."""
    try:
        with open(path, "rb") as f:
            if f.read(1) != pickle.PROTO:               # every pickle of protocol 2 or later starts so
                raise _Refused("it is neither a network pickle nor a torch checkpoint (perhaps a text file or an "
                               "unfinished download)")
            f.seek(0)
            data = _unpickle(_PickleFile(f, lazy=True), _torch_globals(nvidia=True))
            G = data.get("G_ema") if isinstance(data, dict) else None
            if not isinstance(G, _Persistent) or G.class_name != "Generator":
                raise NadaError(f"{path}: no 'G_ema' generator in this pickle")
            _build_tensors(G)
    except NadaError:
        raise
    except Exception as e:
        raise NadaError(f"{path}: refused, not a loadable network pickle: {_refusal(e)}") from None
    return G


def read_nvidia_pickle(path):
    """G_ema of an NVIDIA pickle under rosinality's names -> (state dict, kwargs, w_avg, {})."""
    G = read_g_ema(path)
    try:
        return _convert_nvidia(path, G)
    except (KeyError, AttributeError, TypeError, ValueError, IndexError, OverflowError, _Refused) as e:
        raise NadaError(f"{path}: G_ema is not a StyleGAN2 generator this loader knows (missing or malformed "
                        f"{_first_line(e)})") from None


def _build_tensors(G):
    """Replace the _TensorRefs of a pickled module tree by tensors, decoding each storage once."""
    storages = {}
    for _, m in _modules(G, _nvidia_children):
        for tensors in (m.state.get("_parameters"), m.state.get("_buffers")):
            for name, ref in (tensors.items() if isinstance(tensors, dict) else ()):
                if isinstance(ref, _TensorRef):
                    if id(ref.storage) not in storages:
                        storages[id(ref.storage)] = _legacy_storage(ref.storage)
                    tensors[name] = _view(storages[id(ref.storage)], *ref.args[:3])


def _convert_nvidia(path, G):
    """NVlabs' networks.py names -> rosinality's model.py names: the mapping's fc{i} are style.{i+1}; block b{r}'s
    conv0, conv1 and torgb are convs.{2j}, convs.{2j+1} and to_rgbs.{j} (b4: conv1 and to_rgb1); a layer's affine is
    its conv's modulation; noise_const buffers become noises.noise_{i} in the order the layers read them."""
    mods = lambda obj: obj.state.get("_modules", {})
    syn, mapping = mods(G).get("synthesis"), mods(G).get("mapping")
    if syn is None or mapping is None:
        raise NadaError(f"{path}: G_ema has no mapping/synthesis networks")
    if "input" in mods(syn) or any(k.startswith("L") for k in mods(syn)):
        raise NadaError(f"{path}: this is a StyleGAN3 generator; nada adapts StyleGAN2 generators only")
    res, c_dim, w_dim = G.state["img_resolution"], G.state["c_dim"], G.state["w_dim"]
    if not (type(res) is int and 4 <= res <= 1 << 16 and res & (res - 1) == 0):
        raise NadaError(f"{path}: img_resolution is not a power of two from 4 to 65536; the file is damaged")
    blocks = [2 ** k for k in range(2, int(math.log2(res)) + 1)]
    for r in blocks:
        arch = mods(syn)[f"b{r}"].state.get("architecture", "skip")
        if arch != "skip":                              # never str() a value from the file: it may be a huge DAG
            shown = arch[:20] if isinstance(arch, str) else f"a {type(arch).__name__} as"
            raise NadaError(f"{path}: the '{shown}' synthesis architecture is not supported (only 'skip', "
                            "which every public StyleGAN2 checkpoint uses)")
    if G.state.get("img_channels", 3) != 3:
        raise NadaError(f"{path}: only RGB generators are supported")
    sd = {prefix + k: v for prefix, m in _modules(G, _nvidia_children) for kind in ("_parameters", "_buffers")
          for k, v in m.state.get(kind, {}).items() if isinstance(v, torch.Tensor)}
    n_mlp = mapping.state["num_layers"]
    fcs = [mods(mapping)[f"fc{i}"].state for i in range(n_mlp)]
    if any(fc["activation"] != "lrelu" for fc in fcs) or any(sd[f"mapping.fc{i}.weight"].shape[0] != w_dim
                                                             for i in range(n_mlp)):
        raise NadaError(f"{path}: unsupported mapping network (needs lrelu layers of width w_dim)")
    out = {f"style.{i + 1}.{p}": sd[f"mapping.fc{i}.{p}"] for i in range(n_mlp) for p in ("weight", "bias")}
    if c_dim:
        out["embed.weight"], out["embed.bias"] = sd["mapping.embed.weight"], sd["mapping.embed.bias"]
    out["input.input"] = sd["synthesis.b4.const"][None]
    layers = [("b4.conv1", "conv1"), ("b4.torgb", "to_rgb1")] + [
        (f"b{r}.{theirs}", ours) for j, r in enumerate(blocks[1:])
        for theirs, ours in (("conv0", f"convs.{2 * j}"), ("conv1", f"convs.{2 * j + 1}"), ("torgb", f"to_rgbs.{j}"))]
    convs = [(theirs, ours) for theirs, ours in layers if "torgb" not in theirs]
    for theirs, ours in layers:
        t = f"synthesis.{theirs}."
        out[f"{ours}.conv.weight"] = sd[t + "weight"][None]
        out[f"{ours}.conv.modulation.weight"], out[f"{ours}.conv.modulation.bias"] = sd[t + "affine.weight"], \
            sd[t + "affine.bias"]
        if (theirs, ours) in convs:
            out[f"{ours}.noise.weight"] = sd[t + "noise_strength"].reshape(1)
            out[f"{ours}.activate.bias"] = sd[t + "bias"]
        else:
            out[f"{ours}.bias"] = sd[t + "bias"].reshape(1, 3, 1, 1)
    for i, (theirs, _) in enumerate(convs):
        out[f"noises.noise_{i}"] = sd[f"synthesis.{theirs}.noise_const"][None, None]
    for j, r in enumerate(blocks[1:]):
        fir = sd[f"synthesis.b{r}.conv0.resample_filter"]
        if fir.shape != (4, 4):
            raise NadaError(f"{path}: only the 4-tap resampling filter of StyleGAN2 is supported")
        out[f"convs.{2 * j}.conv.blur.kernel"] = out[f"to_rgbs.{j}.upsample.kernel"] = fir * 4
    conv_clamp = _setting(path, "conv_clamp", mods(mods(syn)["b4"])["conv1"].state.get("conv_clamp"), none_ok=True)
    config = dict(_infer_config(path, out), lr_mlp=float(_setting(path, "bias_gain", fcs[0]["bias_gain"])),
                  conv_clamp=conv_clamp)
    return out, config, sd.get("mapping.w_avg"), {}


def save_generator(G, path, **meta):
    """Write a rosinality-compatible checkpoint (g_ema + latent_avg) with our metadata, atomically."""
    atomic_save(generator_record(G, **meta), path)


def generator_record(G, **meta):
    return {"g_ema": {k: v.detach().cpu() for k, v in G.state_dict().items()},
            "latent_avg": G.latent_avg.detach().cpu(), "nada": {"format": 1, "config": G.config(), **meta}}


@contextlib.contextmanager
def atomic_path(path):
    """A temp file beside `path` to write, renamed onto `path` when the block ends without error: a crash or
    Ctrl-C never leaves a half-written file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    mask = os.umask(0o22)                               # mkstemp makes 0600; a normal file follows the umask,
    os.umask(mask)                                      # which can only be read by setting it: put it straight back
    os.chmod(tmp, 0o666 & ~mask)
    try:
        with writing(path):
            yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


@contextlib.contextmanager
def writing(path):
    """Writes to `path` inside: a full disk or quota is one clear message, not a traceback."""
    import errno
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise NadaError(f"the disk is full: {path} could not be written (nothing under that name changed); free "
                        "some space and run the same command again") from None


def atomic_save(obj, path):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:   # a Python file: a full disk raises OSError(ENOSPC)
        torch.save(obj, f)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------------------
# weights by name (generators, CLIP models, LPIPS): downloaded once into the weights folder, resumable, verified

ADA = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
NGC = "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan2/versions/1/files/"
GENERATORS = {  # name: (url, resolution, approximate download size in MB, class names if conditional)
    "ffhq": (ADA + "ffhq.pkl", 1024, 364, None), "ffhq512": (NGC + "stylegan2-ffhq-512x512.pkl", 512, 364, None),
    "ffhq256": (NGC + "stylegan2-ffhq-256x256.pkl", 256, 280, None),
    "ffhqu": (NGC + "stylegan2-ffhqu-1024x1024.pkl", 1024, 364, None),
    "ffhqu256": (NGC + "stylegan2-ffhqu-256x256.pkl", 256, 280, None),
    "metfaces": (ADA + "metfaces.pkl", 1024, 364, None),
    "metfacesu": (NGC + "stylegan2-metfacesu-1024x1024.pkl", 1024, 364, None),
    "afhqcat": (ADA + "afhqcat.pkl", 512, 347, None), "afhqdog": (ADA + "afhqdog.pkl", 512, 347, None),
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


def weights_path(url, wdir=None):
    """Where the file at `url` lives in the weights folder."""
    return os.path.join(weights_dir(wdir), os.path.basename(url))


def is_model_name(name):
    """A known generator's name that is no file or folder here (a path wins over a name)."""
    return name in GENERATORS and not os.path.exists(name)


def is_offline(offline):
    """--offline, or $NADA_OFFLINE set to anything but 0."""
    return offline or os.environ.get("NADA_OFFLINE", "") not in ("", "0")


CLIP_MB = {"RN50": 244, "RN101": 278, "RN50x4": 402, "RN50x16": 630, "RN50x64": 1260, "ViT-B/32": 338,
           "ViT-B/16": 335, "ViT-L/14": 890, "ViT-L/14@336px": 891}   # approximate download sizes


def fetch_weights(generators, clips, wdir, offline, lpips=False):
    """Download every named file a command needs (generator names, CLIP model names, LPIPS's two files with lpips;
    files are left alone) before anything loads, saying what and where first. Offline, or when a download fails, one
    message names every file still missing, with its URL, size and folder."""
    wanted = [(n, GENERATORS[n][0], GENERATORS[n][2]) for n in generators if is_model_name(n)]
    if clips:                                           # sample needs no CLIP, nor the clip package
        clip = _import_clip()
        wanted += [(n, clip.clip._MODELS[n], CLIP_MB.get(n, 0)) for n in clips
                   if n in clip.available_models() and not os.path.exists(n)]
    wanted += [(n, url, mb) for n, (url, _, mb) in LPIPS_FILES.items()] if lpips else []
    folder = weights_dir(wdir)
    missing = [w for w in dict.fromkeys(wanted) if not os.path.isfile(weights_path(w[1], wdir))]
    if not missing:
        return
    listed = "; ".join(f"{n}: {url} (about {mb} MB) as {os.path.basename(url)}" for n, url, mb in missing)
    if is_offline(offline):
        raise NadaError(f"nada is offline (--offline or NADA_OFFLINE) and {folder} lacks {len(missing)} file(s): "
                        f"{listed}. Fetch them yourself into that folder, or run online")
    dist, error = torch.distributed, None
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1 or dist.get_rank() == 0:              # under torchrun one process downloads, the others wait
        print(f"downloading {len(missing)} file(s) into {folder} (once): {listed}", flush=True)
        for i, (name, url, _) in enumerate(missing):
            try:
                fetch = resolve_lpips if name in LPIPS_FILES else resolve_ckpt if name in GENERATORS else resolve_clip
                fetch(name, wdir, False)
            except NadaError as e:
                rest = "; ".join(f"{n}: {u} (about {mb} MB)" for n, u, mb in missing[i:])
                error = f"{e}. Still missing in {folder}: {rest}"
                break
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise NadaError(error)


def resolve_ckpt(name_or_path, wdir=None, offline=False, flag="--ckpt"):
    """A file path as it is, a run folder's generator.pt, or a known model name, downloaded on first use -> a local
    path."""
    if name_or_path and os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path and os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "generator.pt")):
            raise NadaError(f"{flag} {name_or_path}: no generator.pt there (a run saves it every --save-every steps)")
        return os.path.join(name_or_path, "generator.pt")
    if name_or_path in GENERATORS:
        url = GENERATORS[name_or_path][0]
        return download(url, weights_path(url, wdir), offline=offline)
    raise NadaError(f"{flag} {name_or_path!r} is neither a file nor a known model (nor a run folder); `python "
                    f"nada.py models` lists the names ({', '.join(GENERATORS)})")


def named_generator(ckpt, wdir, offline, device, impl="auto", flag="--ckpt"):
    """A generator by file or by name (resolve_ckpt); a file in the weights folder under a known model's name must have
    that model's resolution and classes (a stray file there would otherwise be trained on in its place)."""
    path = resolve_ckpt(ckpt, wdir, offline, flag)
    G = load_generator(path, device, impl)
    want = (GENERATORS[ckpt][1], len(GENERATORS[ckpt][3] or ())) if is_model_name(ckpt) else (G.size, G.c_dim)
    if (G.size, G.c_dim) != want:
        raise NadaError(f"{path} is a {G.size} px generator with {G.c_dim or 'no'} classes, but {ckpt} is {want[0]} px "
                        f"with {want[1] or 'no'} classes: move the file away (nada then downloads {ckpt}), or pass a "
                        "file by its path")
    return G


def load_clip(name, device="cpu", wdir=None, offline=False):
    """A CLIP model by name (downloaded into the weights folder) or from a local file; float32, frozen."""
    clip = _import_clip()
    path = resolve_clip(name, wdir, offline)
    sd = read_clip_weights(path)
    try:                                                # on the meta device: shapes that fit, no memory, no init
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")             # "copying into a meta parameter is a no-op": that is the point
            model = clip.model.build_model(dict(sd))
        model.load_state_dict(sd, assign=True)
    except Exception as e:
        raise NadaError(f"{path}: the tensors do not fit a CLIP model: {_first_line(e)}") from None
    for block in model.transformer.resblocks:           # its causal mask is no parameter: made again, off the meta
        block.attn_mask = model.build_attention_mask()
    return model.float().eval().requires_grad_(False).to(device)


def resolve_clip(name, wdir=None, offline=False):
    """A CLIP model's file: `name` itself, or OpenAI's file for a model name, downloaded into the weights folder."""
    clip = _import_clip()
    if os.path.isfile(name):
        return name
    if name not in clip.available_models():
        raise NadaError(f"unknown CLIP model {name!r}: use a file path or one of {', '.join(clip.available_models())}")
    url = clip.clip._MODELS[name]
    return download(url, weights_path(url, wdir), sha256=url.split("/")[-2], offline=offline)


def read_clip_weights(path):
    """CLIP's state dict from a TorchScript archive (OpenAI's files) or a torch.save'd state dict, read as data:
    clip.load would torch.jit.load an archive, which runs code from it. Checked like a generator's tensors."""
    try:
        with TorchFile(path) as tf:
            sd = _archive_state_dict(tf) if tf.archive else tf.build(tf.load())
    except Exception as e:
        raise NadaError(f"{path}: not a loadable CLIP model: {_refusal(e)}") from None
    if not (isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())):
        raise NadaError(f"{path}: not a CLIP model (expected a state dict of tensors)")
    for k in ("input_resolution", "context_length", "vocab_size"):   # integers in OpenAI's archives, which
        sd.pop(k, None)                                                 # build_model drops
    _check_storage(path, sd, os.path.getsize(path))
    if getattr(sd.get("positional_embedding"), "ndim", 0) != 2 or sd["positional_embedding"].shape[0] != 77:
        raise NadaError(f"{path}: not a CLIP text encoder of 77 tokens (its positional_embedding does not fit)")
    return sd


def _archive_state_dict(tf):
    """The parameters and buffers of a TorchScript archive: the attributes of each module in its pickled tree that the
    module's class declares as such in its code (read as text, never run)."""
    tree = tf.load(scripted=True)
    if not isinstance(tree, _ScriptObject):
        raise _Refused("its data.pkl holds no module")
    sd, declared = {}, {}                               # code file -> {class: its parameters and buffers}
    children = lambda m: [(k, v) for k, v in m.state.items() if isinstance(v, _ScriptObject)] \
        if isinstance(m.state, dict) else []
    for prefix, m in _modules(tree, children):
        if not isinstance(m.state, dict):
            raise _Refused(f"module {prefix[:-1][:80] or 'root'} restores itself with code (a scripted "
                           "__setstate__); nada reads archives of plain modules only")
        module, cls = m.qualname.rsplit(".", 1)
        if module not in declared:
            declared[module] = _declared_tensors(tf, module)
        names = declared[module].get(cls)
        sd.update({prefix + k: v for k, v in m.state.items()
                   if isinstance(v, _TensorRef) and (names is None or k in names)})
    return tf.build(sd)


def _declared_tensors(tf, module):
    """{class: the parameters and buffers it declares} from a scripted module's code, read as text once: the lines
    `  __parameters__ = ["weight", ]` in a `class Name(Module):` block. Its other tensor attributes are not state; a
    class whose code says nothing is missing (then every tensor attribute counts)."""
    try:
        code = tf.record(f"code/{module.replace('.', '/')}.py", most=CODE_MAX).decode("utf-8", "replace")
    except KeyError:
        return {}
    classes, cls = {}, None
    for line in code.splitlines():
        if not line.startswith(" "):
            cls = line[6:-9] if line.startswith("class ") and line.endswith("(Module):") else None
        elif cls and line.startswith(("  __parameters__ = [", "  __buffers__ = [")):
            classes.setdefault(cls, set()).update(re.findall(r'"(\w+)"', line))
    return classes


def parse_clip(names, weights=None, flag="--clip"):
    """--clip and --clip-weights -> (names, weights: positive and finite, 1 each by default), or one clear error."""
    names = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
    if not names or len(set(names)) != len(names):
        raise NadaError(f"{flag} {','.join(names)!r}: name one or more different CLIP models, e.g. {flag} ViT-B/32")
    try:
        weights = [1.0] * len(names) if weights is None else [float(w) for w in (
            weights.split(",") if isinstance(weights, str) else weights)]
    except (ValueError, TypeError):
        raise NadaError(f"--clip-weights {weights!r}: give numbers separated by commas") from None
    if len(weights) != len(names):
        raise NadaError(f"--clip-weights has {len(weights)} values for {len(names)} CLIP models ({', '.join(names)})")
    if not all(0 < w < math.inf for w in weights):
        raise NadaError(f"--clip-weights {','.join(map(str, weights))}: each weight must be a positive number")
    return names, weights


def load_clip_models(names, weights, device, wdir, offline, preloaded=None, load=None, flag="--clip"):
    """--clip and --clip-weights -> (names, weights, models); `preloaded` models are used as they are."""
    names, weights = parse_clip(names, weights, flag)
    return names, weights, preloaded or [(load or load_clip)(n, device, wdir, offline) for n in names]


def read_json(path):
    """A JSON object from a regular file, or {} if it is missing or damaged (nested too deep, too large, not JSON)."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        if os.path.isfile(path) and os.path.getsize(path) <= MAX_JSON:
            obj = json.load(open(path))
            return obj if isinstance(obj, dict) else {}
    return {}


def sha256_of(path):
    """A file's SHA-256, hex: what a latent records of its photo and base, and what downloads are checked against."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, dest, sha256=None, offline=False):
    """Fetch url to dest through dest.part (resumed when the server allows ranges), verify, rename into place. The
    size is always checked; the SHA-256 against `sha256` when the source publishes one, else against the hash
    recorded in the folder's manifest.json at the first download. $NADA_MIRROR replaces the host."""
    folder, name = os.path.split(os.path.abspath(dest))
    manifest = read_json(os.path.join(folder, "manifest.json"))
    record = manifest.get(name)
    if record is not None and not (isinstance(record, dict) and type(record.get("size")) is int
                                   and isinstance(record.get("sha256"), str)):
        raise NadaError(f"{folder}/manifest.json: its entry for {name} is damaged; delete that entry, or the file")
    if os.path.isfile(dest):
        if record and os.path.getsize(dest) != record["size"]:
            raise NadaError(f"{dest} has {os.path.getsize(dest)} bytes, not the {record['size']} recorded when it was "
                            "downloaded: delete it to download it again")
        return dest
    environment()                                       # $NADA_MIRROR, if set, must be a URL
    if os.environ.get("NADA_MIRROR"):
        url = os.environ["NADA_MIRROR"].rstrip("/") + "/" + os.path.basename(url)
    hand = f"fetch {url} yourself and place it at {dest}"
    if is_offline(offline):
        raise NadaError(f"{name} is not in {folder} and nada is offline (--offline or NADA_OFFLINE): {hand}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise NadaError(f"cannot create the weights folder {folder}: {e.strerror}; choose another with --weights-dir")
    _fetch(url, dest + ".part", name, hand)
    expected, digest = sha256 or (record or {}).get("sha256"), sha256_of(dest + ".part")
    if expected and not digest.startswith(expected):    # torchvision publishes the first 8 hex digits
        os.remove(dest + ".part")
        raise NadaError(f"{name}: SHA-256 mismatch (got {digest[:12]}..., expected {expected[:12]}...); "
                        f"the download was removed; try again, or {hand}")
    os.replace(dest + ".part", dest)
    manifest = read_json(os.path.join(folder, "manifest.json"))
    manifest[name] = {"url": url, "size": os.path.getsize(dest), "sha256": digest}
    atomic_write_text(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=1))
    return dest


def _fetch(url, part, name, hand):
    """Stream url into part with a progress bar, resuming an earlier partial download."""
    import urllib.error
    import urllib.request
    from tqdm import tqdm
    start = os.path.getsize(part) if os.path.isfile(part) else 0
    headers = {"User-Agent": "nada", **({"Range": f"bytes={start}-"} if start else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:                     # the .part is already complete
            return
        raise NadaError(f"could not download {name} (HTTP {e.code} {e.reason}); {hand}") from None
    except (urllib.error.URLError, OSError) as e:
        raise NadaError(f"could not download {name} ({getattr(e, 'reason', e)}); {hand}") from None
    with response:
        start = start if response.status == 206 else 0  # a server that ignores the range sends it all again
        length = response.headers.get("Content-Length")
        total = int(length) + start if length else None
        try:
            with open(part, "ab" if start else "wb") as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                                                 desc=name, disable=None, leave=False) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise NadaError(f"download of {name} broke off ({e}); run again to resume, or {hand}") from None
    if total is not None and os.path.getsize(part) != total:
        raise NadaError(f"download of {name} broke off at {os.path.getsize(part)} of {total} bytes; run again to "
                        f"resume, or {hand}")


def base_generator(s, device, meta=False, generator=None, clips=True):
    """A run's base generator: `generator` if one is given (already loaded), else s.ckpt loaded onto `device`; for the
    dry run (meta), its twin on the meta device: a named model's known architecture, or the file's tensor shapes.
    Every named file the run needs is fetched first, s.clip's too unless `clips` is False (models given)."""
    if meta:
        G = meta_generator(s.ckpt, s.wdir) if generator is None else meta_twin(generator)
    else:
        fetch_weights([s.ckpt] if generator is None else [], parse_clip(s.clip)[0] if clips else [], s.wdir, s.offline)
        G = generator if generator is not None else named_generator(s.ckpt, s.wdir, s.offline, device, s.impl)
    class_labels(G, s.cls, 1)                           # a bad --class fails before anything is written
    return G


def run_clip_models(s, device, memory, meta=False, preloaded=None):
    """A run's CLIP models -> (names, loss weights, modules): s.clip loaded onto `device` (or `preloaded`, which are not
    changed), for the dry run their meta twins; with --memory low on CUDA in float16 (LayerNorms stay float32), as
    clip.load does on CUDA."""
    names, weights, models = load_clip_models(s.clip, s.clip_weights, "meta" if meta else device, s.wdir, s.offline,
                                              None if meta else preloaded, load=meta_clip if meta else load_clip)
    if memory == "low" and device.startswith("cuda"):
        models = [copy.deepcopy(m) if preloaded else m for m in models]
        for m in models:
            _import_clip().model.convert_weights(m)
    return names, weights, models


# ----------------------------------------------------------------------------------------------------------
# run folders: config, lock, resume, log, previews, atomic saves, Ctrl-C

SAMPLE_TRUNCATION = 0.7                # run previews, as in NADA
RUN_FILES = ("config.json", "log.jsonl", "samples", "generator.pt", "state.pt", ".lock", "eval.json", "sample")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after the step was saved: the CLI exits with 128 + the signal's number."""


class RunFolder:
    """A run's folder: config.json (settings), log.jsonl (a line per step), samples/ (previews), generator.pt (the
    adapted generator), state.pt (optimizer and RNG state: everything --resume needs) and .lock, held while a
    process trains in it. Checked when made, before any work; written only inside `with`."""

    def __init__(self, settings):
        self.settings, self.path = settings, settings.resume or settings.out or os.path.join("runs", run_name(settings))
        self.lock = self.stop_signal = self.bar = self.saved = self.frozen_row = None
        self.handlers = {}
        if not settings.resume:
            self.refuse_other_runs()
            others = [n for n in os.listdir(self.path) if n not in RUN_FILES and not n.startswith(".tmp-")] \
                if os.path.isdir(self.path) else []
            if others:                                  # a run writes config.json and log.jsonl: not over other files
                raise NadaError(f"--out {self.path} holds other files ({', '.join(sorted(others)[:3])}): a run needs "
                                "a new or empty folder; choose another --out")

    def refuse_other_runs(self):
        if os.path.isfile(os.path.join(self.path, "state.pt")):
            raise NadaError(f"{self.path} holds a run already: continue it with --resume {self.path}, or choose "
                            "another --out")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise NadaError(f"--out {self.path} is a file, not a folder; choose another --out")

    def __enter__(self):
        """Create the folder, take its lock (one process per run), clean what a killed save left, write config.json,
        and catch Ctrl-C and SIGTERM. If any of it fails, __exit__ runs: the lock is let go, a new folder removed."""
        self.created = False
        with contextlib.suppress(OSError):             # made here (not by a process racing us), so removed again
            os.makedirs(self.path)                      # if the run fails before a save
            self.created = True
        with contextlib.ExitStack() as undo:
            undo.push(self.__exit__)
            make_folder(self.path)
            self.take_lock()
            make_folder(self.path, "samples")
            for folder in (self.path, os.path.join(self.path, "samples")):   # temp files of a save that was killed
                for name in (n for n in os.listdir(folder) if n.startswith(".tmp-")):
                    os.remove(os.path.join(folder, name))
            if not self.settings.resume:                # a run may have finished here while we loaded
                self.refuse_other_runs()
            recorded = {f.name: getattr(self.settings, f.name) for f in recorded_fields()}
            atomic_write_text(os.path.join(self.path, "config.json"), json.dumps(recorded, indent=1))
            self.catch_signals()
            undo.pop_all()
        return self

    def __exit__(self, kind, error, tb):
        """Give the signals and the lock back; a new run that failed before its first save leaves nothing behind."""
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        if self.bar is not None:
            self.bar.close()
        if kind is not None and self.created and not os.path.isfile(os.path.join(self.path, "state.pt")):
            shutil.rmtree(self.path, ignore_errors=True)
        if self.lock:
            self.lock.close()

    def take_lock(self):
        """An flock on .lock, which holds our pid; it goes when this process ends, however it ends."""
        import fcntl
        self.lock = open(os.path.join(self.path, ".lock"), "a+")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "?"       # __exit__ closes the file
            raise NadaError(f"{self.path} is in use by another nada process (pid {holder}); wait for it to finish, "
                            "or choose another --out") from None
        with writing(self.lock.name):
            self.lock.truncate(0)
            self.lock.write(str(os.getpid()))
            self.lock.flush()

    def catch_signals(self):
        """The first Ctrl-C or SIGTERM sets stop_signal, and the loop saves and stops after its step; a second one
        stops at once. Outside the main thread signals are left alone."""
        def on_signal(signum, _):
            if self.stop_signal:
                raise Interrupted(128 + signum)
            self.stop_signal = signum
        with contextlib.suppress(ValueError):
            self.handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def resume(self, G, opt, rng):
        """Load state.pt into G, opt and rng (for --resume), keep the log's lines before that step, and start the
        progress bar. -> the step to start from (0 for a new run)"""
        start, s = 0, self.settings
        if s.resume:
            try:
                with TorchFile(os.path.join(self.path, "state.pt")) as tf:
                    state = tf.build(tf.load())
                G.load_state_dict(state["g_ema"], strict=True)
                opt.load_state_dict(state["optimizer"])
                rng.set_state(state["rng"])
                start = self.saved = int(state["step"])
            except Exception as e:
                raise NadaError(f"--resume {self.path}: state.pt is unreadable or from another setup "
                                f"({_first_line(e)[:120]}); the run cannot continue: start a new --out") from None
            if start >= s.iters:
                where = "finished" if start == s.iters else f"at step {start}; --iters {s.iters} would go back"
                raise NadaError(f"--resume {self.path}: the run is {where} (step {start}): pass --iters N over {start} "
                                "to train further")
        kept = [r for r in read_log(self.path) if r["iter"] < start]   # a line torn by a kill goes too
        atomic_write_text(os.path.join(self.path, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))
        self.started = time.time()                      # log.jsonl's seconds count the whole run
        self.t0 = self.started - (max(float(kept[-1]["seconds"]), 0.0) if kept else 0.0)
        self.bar = Progress("train", s.iters, start, s.progress)
        return start

    def log(self, step, loss, losses, layers):
        """A line of log.jsonl, and the progress bar; a loss that is not finite stops the run, saying why."""
        if not math.isfinite(loss):                     # the weights saved after `saved` steps gave step `saved`'s loss
            raise NadaError(f"the loss became {loss} at step {step}; stopped. " + (
                "Nothing was saved yet, so the run folder was removed." if self.saved is None else
                f"The last good checkpoint (step {self.saved}) is in {self.path}." if self.saved < step else
                f"The checkpoint in {self.path} (step {self.saved}) gives that loss too: start again.") +
                " Try a lower --lr.")
        with writing(os.path.join(self.path, "log.jsonl")), open(os.path.join(self.path, "log.jsonl"), "a") as f:
            f.write(json.dumps(dict(iter=step, loss=loss, losses=losses, layers=layers,
                                    seconds=round(time.time() - self.t0, 3))) + "\n")
        self.bar.update(loss=f"{loss:.4f}")

    @torch.no_grad()
    def preview(self, G_frozen, G, step):
        """samples/STEP.png: the frozen generator's row above the adapted one's, the same latents at every step
        (seeded by the run's seed), truncation 0.7."""
        s, device = self.settings, G.latent_avg.device
        z = torch.randn(s.n_sample, G.z_dim, generator=torch.Generator().manual_seed(s.seed + 2)).to(device)
        c = class_labels(G, s.cls, s.n_sample, torch.Generator().manual_seed(s.seed + 3))
        ws = G_frozen.mapping(z, None if c is None else c.to(device), SAMPLE_TRUNCATION)
        if self.frozen_row is None:                     # the frozen generator never changes: rendered once
            self.frozen_row = G_frozen.synthesis(ws)
        adapted = G.synthesis(ws) if step else self.frozen_row   # at step 0 the two generators are equal
        save_image(make_grid(torch.cat([self.frozen_row, adapted]), ncol=s.n_sample),
                   os.path.join(self.path, "samples", f"{step:06d}.png"))

    def save(self, G, opt, rng, step, clip_names, clip_weights):
        """generator.pt (the adapted generator and what made it) and state.pt (what --resume reads): both written to
        temp files, then renamed, state.pt last. A full disk changes neither; a kill between the renames leaves the
        state a save behind the generator, and --resume redoes those steps exactly."""
        s, paths = self.settings, [os.path.join(self.path, f) for f in ("state.pt", "generator.pt")]
        with atomic_path(paths[0]) as state, atomic_path(paths[1]) as generator:
            with writing(paths[1]), open(generator, "wb") as f:
                torch.save(generator_record(G, iterations=step, src=s.src, tgt=s.tgt, tgt_img=s.tgt_img, base=s.ckpt,
                                            layers=s.layers, clip=clip_names, clip_weights=clip_weights, seed=s.seed,
                                            cls=s.cls, consistency=s.consistency), f)
            with writing(paths[0]), open(state, "wb") as f:
                torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng.get_state(),
                            "g_ema": {k: v.detach().cpu() for k, v in G.state_dict().items()}}, f)
        self.saved = step

    def interrupt(self, step):
        """After a signal and the save of `step`: say how to continue, and stop."""
        self.bar.close()
        print(f"\ninterrupted: saved at step {step} in {self.path}; continue with "
              f"`python nada.py train --resume {self.path}`", flush=True)
        raise Interrupted(128 + self.stop_signal)


def run_name(s):
    """runs/<src>_to_<tgt> (or studies/...): the default folder name of a run or a study."""
    return f"{_slug(s.src)}_to_{_slug('images' if s.tgt_img else s.tgt)}"


def run_step(folder):
    """The step a run folder's state.pt has reached (0 if none)."""
    state = os.path.join(folder, "state.pt")
    with contextlib.suppress(Exception), TorchFile(state) as tf:
        return int(tf.load()["step"])
    return 0


def read_log(folder):
    """log.jsonl's records (a line torn by a kill, or anything that is not a step's record, is skipped)."""
    path, records = os.path.join(folder, "log.jsonl"), []
    lines = iter(functools.partial(open(path).readline, 1 << 16), "") if os.path.isfile(path) else ()
    for line in lines:                                  # a line over 64 kB comes in pieces, none of them a record
        with contextlib.suppress(ValueError, RecursionError):   # a torn or hostile line is skipped
            r = json.loads(line)
            if isinstance(r, dict) and all(isinstance(r.get(k), (int, float)) for k in ("iter", "loss", "seconds")):
                records.append(r)
    return records


def is_run_folder(path):
    return any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "state.pt", "results.json"))


def sample_paths(ckpt, out, wdir, offline, runs="runs", settings=None):
    """-> (checkpoint file: --ckpt, else the newest runs/*/generator.pt; output folder: --out, else RUN/sample
    for a run's generator, else samples/<checkpoint name>). settings: sample's, whose --walk flags are checked."""
    if settings:
        check_walk(settings)
    found = [os.path.join(runs, d, "generator.pt") for d in (os.listdir(runs) if os.path.isdir(runs) else [])]
    found = [p for p in found if os.path.isfile(p)]
    if not ckpt and not found:
        raise NadaError(f"no --ckpt given and no trained generator in {runs}/*/generator.pt: pass --ckpt FILE or NAME")
    if out and is_run_folder(out):
        raise NadaError(f"--out {out} is a run's or a study's folder: sample writes into one of its own (the default "
                        "is RUN/sample); choose another --out")
    fetch_weights([ckpt, *(settings.also or ())] if ckpt and settings else [], [], wdir, offline)
    path = resolve_ckpt(ckpt, wdir, offline) if ckpt else max(found, key=os.path.getmtime)
    name = os.path.basename(path)
    return path, out or (os.path.join(os.path.dirname(path), "sample") if name == "generator.pt"
                         else os.path.join("samples", _slug(os.path.splitext(name)[0])))


def check_walk(s):
    """sample's animation flags, before anything loads: --frames, --fps and --format only with --walk; two seeds or
    more; at most MAX_FRAMES frames; WebP only where Pillow can write it."""
    if not s.walk:
        if any(getattr(s, f.name) != f.default for f in dataclasses.fields(s) if f.name in ("frames", "fps", "format")):
            raise NadaError("--frames, --fps and --format shape the animation of --walk N: add --walk, or drop them")
        return
    seeds = parse_seeds(s.seeds, s.walk)
    if len(seeds) < 2 or len(seeds) * s.frames > MAX_FRAMES:
        raise NadaError(f"--walk: {len(seeds)} seeds x {s.frames} frames; a walk needs 2 seeds or more and at most "
                        f"{MAX_FRAMES} frames in all")
    from PIL import features
    if s.format == "webp" and not features.check("webp"):
        raise NadaError("this Pillow cannot write WebP: pass --format gif")


def sample_generators(G, path, s, device):
    """The generators sample renders, in column order: the base G records (with --compare, and with --walk when G
    records one), G, and --also's, each of G's architecture."""
    base = G.meta.get("base")
    if s.compare and not base:
        raise NadaError(f"--compare: {path} records no base generator (only checkpoints written by `train` do)")
    others = [named_generator(p, s.wdir, s.offline, device, s.impl, "--also") for p in s.also or ()]
    for p, other in zip(s.also or (), others):
        if other.config() != G.config():
            raise NadaError(f"--also {p}: another architecture than {path}; pass generators of the same base")
    here = base and (os.path.exists(base) or base in GENERATORS)
    if s.compare and not here:
        raise NadaError(f"--compare: the base {path} records, {base}, is not there any more; sample without --compare")
    if s.walk and base and not here:
        print(f"walk: the base {path} records, {base}, is not there any more: the walk shows the run alone")
    first = [named_generator(base, s.wdir, s.offline, device, s.impl)] if here and (s.compare or s.walk) else []
    return first + [G] + others


@torch.no_grad()
def write_walk(generators, seeds, labels, s, device, out):
    """sample --walk: an animation that loops through the seeds' latents, eased in W (it slows into each latent), the
    generators side by side on the same ws and noise, as OUT/walk.webp or walk.gif -> OUT."""
    from PIL import Image
    G = generators[0]
    ws = G.mapping(seed_latents(G, seeds).to(device), None if labels is None else labels.to(device), s.trunc)
    noise = [t.to(device) for t in G.make_noise(1, torch.Generator().manual_seed(seeds[0]), "cpu")] \
        if s.noise_mode == "random" else None          # one noise for the whole walk: random per frame flickers
    width, n, widest = G.size * len(generators), len(seeds) * s.frames, 16383 if s.format == "webp" else 65535
    if width > widest or n * width * G.size * 3 > MAX_WALK_BYTES:
        raise NadaError(f"--walk: {n} frames of {width}x{G.size} px ({n * width * G.size * 3 / 2 ** 30:.1f} GiB held "
                        f"until written; at most {MAX_WALK_BYTES / 2 ** 30:.0f} GiB, {s.format.upper()} frames at most "
                        f"{widest} px wide): fewer seeds, --frames or --also runs")
    frames = []
    for i, f in itertools.product(range(len(seeds)), range(s.frames)):
        t = f / s.frames
        w = ws[i].lerp(ws[(i + 1) % len(seeds)], t * t * (3 - 2 * t))[None]            # smoothstep easing
        frames.append(Image.fromarray(to_uint8(torch.cat([g.synthesis(w, s.noise_mode, noise) for g in generators],
                                                         dim=3))[0]))
    path = os.path.join(out, f"walk.{s.format}")
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format=s.format.upper(), save_all=True, append_images=frames[1:], loop=0,
                       duration=round(1000 / s.fps), **({"quality": 90} if s.format == "webp" else {}))
    print(f"wrote {path}: {len(frames)} frames at {s.fps} fps, {len(generators)} generator(s) side by side")
    return out


class Progress:
    """A progress bar on a terminal; where stdout is not one (a log file, CI, nohup), a line at every tenth of the
    work and at least once a minute: what, how far, the latest figures, the rate and the time left."""

    def __init__(self, what, total, done=0, show=True, unit="steps"):
        self.what, self.total, self.done, self.unit, self.first = what, max(total, 1), done, unit, done
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=what, unit=unit[:-1], dynamic_ncols=True)
        self.lines = show and not sys.stdout.isatty()
        self.t0 = self.said = time.time()

    def update(self, n=1, **figures):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(figures, refresh=False)
        now = time.time()
        if self.lines and (self.done * 10 // self.total > (self.done - n) * 10 // self.total or now - self.said >= 60):
            rate = (self.done - self.first) / max(now - self.t0, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            shown = "".join(f", {k} {v}" for k, v in figures.items())
            left = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f} s"
            print(f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done // self.total}%){shown}, "
                  f"{rate:.3g} {self.unit}/s, {left} left", flush=True)
            self.said = now

    def close(self):
        if self.bar is not None:
            self.bar.close()


def make_folder(path, sub=""):
    """Create an output folder (and a subfolder) we can write in, or one clear error."""
    try:
        os.makedirs(os.path.join(path, sub), exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise NadaError(f"cannot write the output folder {path}: {e.strerror}; choose another with --out") from None


def _slug(text, limit=40):
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "run"


def ops_status(device, impl="auto"):
    """For the startup line: which path each op takes on this device, and why."""
    if impl == "ref" or torch.device(device).type != "cuda":
        return "ref" if impl == "ref" else "ref (cpu)"
    status = {op: load_op(op) for op in OPS}
    return " ".join(f"{op}={'cuda' if ops else f'ref ({reason})'}" for op, (ops, reason) in status.items())


def startup_line(cmd, device, impl, *parts):
    """`nada CMD | device D | ops PATH | ...`: what runs, printed before any work."""
    return " | ".join([f"nada {cmd}", f"device {device}", f"ops {ops_status(device, impl)}", *map(str, parts)])


def describe_run(s, t, memory):
    """The startup line's account of a run (t: its Training): CLIP models, layers, memory, resolution, prompts."""
    clip = "CLIP " + ", ".join(f"{n} x{w:g}" for n, w in zip(t.names, t.weights))
    if isinstance(t.layers, int):
        layers = f"layers auto, top {t.layers} of {t.G.num_ws} W+ entries per step"
    else:
        trained = sum(p.numel() for n, p in t.G.named_parameters() if n.startswith(tuple(x + "." for x in t.layers)))
        chosen = f"auto, all {t.G.num_ws} W+ entries" if s.layers == "auto" else s.layers
        layers = f"layers {chosen} ({len(t.layers)} layers, {trained / 1e6:.2f}M params)"
    goal = f"{'images' if t.images else repr(s.src)} -> {s.tgt_img or repr(s.tgt)}"
    return clip, layers, memory, f"{t.G.size} px, {goal}"


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


def load_image(path, short=448):
    """An image file -> [1, 3, H, W] in [-1, 1], its short side at most `short` (what CLIP reads, twice over). The
    size is read from the header and checked before anything is decoded; a JPEG is decoded at a reduced scale."""
    from PIL import Image, ImageOps
    if not os.path.isfile(path):
        raise NadaError(f"{path}: {'not a regular file' if os.path.exists(path) else 'no such file'}")
    try:
        with Image.open(path, formats=("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")) as img:
            if img.width * img.height > MAX_PIXELS:
                raise NadaError(f"{path}: {img.width}x{img.height} pixels, more than the {MAX_PIXELS} an image may "
                                "have here (a decompression bomb?); use a smaller image")
            img.draft("RGB", (short, short))            # JPEG: decode at 1/2, 1/4 or 1/8 scale where that suffices
            img = ImageOps.exif_transpose(img)          # a phone's photo: turned as its camera was
            if img.mode.startswith("I;16"):             # 16-bit grey: convert("RGB") would clip at 255, not scale
                img = img.point(lambda v: v / 256)
            img = img.convert("RGB")
            img.thumbnail((short * img.width // min(img.size), short * img.height // min(img.size)), Image.LANCZOS)
    except NadaError:
        raise
    except Exception as e:
        raise NadaError(f"{path}: not a readable image ({_first_line(e)})") from None
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------
# eval and study: CLIP-only metrics of an adapted generator against its base, those of HyperDomainNet (Alanov et
# al., arXiv 2210.08884) and StyleDomain (arXiv 2212.10229), and a study that trains and compares several settings;
# under torchrun several GPUs share the work

METRICS = ("clip_score", "directional", "diversity", "base_diversity", "diversity_ratio", "pair_similarity")
Samples = namedtuple("Samples", "seeds labels trunc batch")   # z per seed as `sample` draws it; classes or None
Goal = namedtuple("Goal", "src tgt images")                     # prompts src -> tgt, or target images (tgt None)


def diversity(emb):
    """Mean over pairs i < j of 1 - cos(e_i, e_j) for unit embeddings [N, D]: from the Gram matrix, O(N^2) memory."""
    n, emb = len(emb), emb.double()                    # float64: identical images give 0, not rounding noise
    gram = emb @ emb.T                                                                # [N, N]
    return (1 - (gram.sum() - gram.diagonal().sum()) / max(n * (n - 1), 1)).clamp(min=0).float()


def clip_metrics(base, adapted, target, direction):
    """base, adapted: unit CLIP embeddings [N, D] of the base and the adapted generator's images of the same latents;
    target: the unit target text embedding [D]; direction: the unit text direction [D] (as training's). -> floats:
    clip_score (adapted vs target), directional (image change vs text direction; 0 where nothing changed),
    diversity and base_diversity, diversity_ratio (the collapse index: 1 = none), pair_similarity (content kept)."""
    change = F.normalize(adapted - base, dim=-1)       # an unchanged image has change 0, not NaN
    d, d_base = diversity(adapted), diversity(base)
    ratio = d / d_base if d_base > 1e-6 else torch.tensor(float("nan"))
    metrics = dict(clip_score=(adapted @ target).mean(), directional=(change @ direction).mean(), diversity=d,
                   base_diversity=d_base, diversity_ratio=ratio, pair_similarity=(adapted * base).sum(-1).mean())
    return {k: float(v) for k, v in metrics.items()}


def environment():
    """torchrun's variables and $NADA_MIRROR, checked before anything loads -> (WORLD_SIZE, LOCAL_RANK)."""
    world, rank, local = (os.environ.get(k, "0") for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if not (world.isdigit() and rank.isdigit() and local.isdigit()) or int(world) > 1 and "RANK" not in os.environ:
        shown = ", ".join(f"{k}={os.environ[k]!r}" for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ)
        raise NadaError(f"{shown}: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; run `torchrun --nproc_per_node N "
                        "nada.py ...`, or unset them")
    mirror = os.environ.get("NADA_MIRROR", "")
    if mirror and not re.match(r"(https?|ftp|file)://", mirror):
        raise NadaError(f"NADA_MIRROR={mirror[:80]!r} is not a URL (http://, https://, ftp:// or file://)")
    return max(int(world), 1), int(local)


def distributed(device, impl):
    """-> (rank, world size, this process's device): under torchrun the process group joined (nccl on GPUs, gloo on
    the CPU; a long timeout, as a study's settings can train for hours between collectives), and `auto` or `cuda`
    this process's own GPU (LOCAL_RANK); else (0, 1, device)."""
    world, local = environment()
    if world == 1:
        return 0, 1, check_device(device, impl)
    import datetime
    import torch.distributed as dist
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and local >= gpus:
        raise NadaError(f"torchrun started process {local} on this machine, but torch sees {gpus} GPUs: pass "
                        f"--nproc_per_node {gpus} or fewer")
    if not dist.is_initialized():
        if gpus:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if gpus else "gloo", timeout=datetime.timedelta(days=2))
    device = f"cuda:{local}" if gpus and device in ("auto", "cuda") else device
    return dist.get_rank(), dist.get_world_size(), check_device(device, impl)


def gather(obj, world):
    """Every process's obj, in rank order (torch.distributed.all_gather_object); [obj] in one process."""
    if world == 1:
        return [obj]
    objs = [None] * world
    torch.distributed.all_gather_object(objs, obj)
    return objs


@torch.no_grad()
def measure(base, G, models, goal, samples, device, shard=(0, 1), show=True):
    """clip_metrics per CLIP model (a list of dicts) of G against base, on the images of `samples` (ws from the base's
    mapping, constant noise). Under torchrun (shard: rank, world size) each process embeds its share of the samples
    and every process gets the merged result."""
    rank, world = shard
    mine = list(range(rank, len(samples.seeds), world))
    embs = [[[], []] for _ in models]                   # [model][base, G]: batches of unit embeddings [n, D]
    bar = Progress("eval", len(mine), show=show, unit="images")
    for i in range(0, len(mine), samples.batch):
        idx = mine[i:i + samples.batch]
        z = seed_latents(base, [samples.seeds[k] for k in idx]).to(device)
        ws = base.mapping(z, None if samples.labels is None else samples.labels[idx].to(device), samples.trunc)
        for j, g in enumerate((base, G)):
            img = g.synthesis(ws)
            for m, model in enumerate(models):
                embs[m][j].append(encode_images(model, img).cpu())
        bar.update(len(idx))
    bar.close()
    parts = gather((mine, [[torch.cat(e) for e in per_model] for per_model in embs]), world)
    order = torch.tensor([i for idx, _ in parts for i in idx]).argsort()   # back into seed order
    results = []
    for m, model in enumerate(models):
        base_emb, emb = (torch.cat([e[m][j] for _, e in parts])[order] for j in (0, 1))
        if goal.images:                                 # image targets: the direction from the base's images
            target = torch.cat([encode_images(model, img.to(device)) for img in goal.images]).mean(0)
            target = F.normalize(target, dim=0).cpu()
            direction = F.normalize(target - base_emb.mean(0), dim=0)
        else:
            direction, target = (t.cpu() for t in text_targets(model, goal.src, goal.tgt))
        results.append(clip_metrics(base_emb, emb, target, direction))
    return results


def eval_report(results, names, trained_with, **about):
    """-> (the JSON record: metrics averaged over the CLIP models, each model's under per_clip; the printed table)."""
    mean = {k: sum(r[k] for r in results) / len(results) for k in METRICS}
    record = dict(mean, clip=names, **about, per_clip=dict(zip(names, results)))
    lines = [f"{'':18}" + "".join(f"{n[-14:]:>16}" for n in names)]
    lines += [f"{k:18}" + "".join(f"{r[k]:16.4f}" for r in results) for k in METRICS]
    same = [n for n in names if n in trained_with or os.path.basename(n) in map(os.path.basename, trained_with)]
    if same:
        lines.append(f"note: {', '.join(same)} also trained this run: its scores partly measure the training loss "
                     f"itself; for a held-out measure use another --clip (default {EVAL_CLIP})")
    if all(r["pair_similarity"] >= 1 - 1e-6 for r in results):
        lines.append("note: the adapted images equal the base images: no change, so directional is 0")
    return record, "\n".join(lines)


def eval_about(samples, base, goal, tgt_img, cls, iterations):
    """What an eval record says it measured (eval and study write the same record; a study reuses one that matches):
    the seeds as ranges, [0, 1, 2, 5] -> '0-2,5'."""
    seeds = samples.seeds
    firsts = [s for i, s in enumerate(seeds) if i == 0 or seeds[i - 1] != s - 1]
    lasts = [s for i, s in enumerate(seeds) if i == len(seeds) - 1 or seeds[i + 1] != s + 1]
    return dict(n=len(seeds), seeds=",".join(f"{a}-{b}" if a < b else str(a) for a, b in zip(firsts, lasts)),
                trunc=samples.trunc, base=base, src=goal.src, tgt=goal.tgt, tgt_img=tgt_img, cls=cls,
                iterations=iterations)


def write_json(obj, path):
    """Atomically; NaN and infinities (a diversity ratio over a base of identical images) are written as null."""
    atomic_write_text(path, json.dumps(json.loads(json.dumps(obj), parse_constant=lambda _: None), indent=1))


def eval_paths(ckpt, out, wdir, offline):
    """--ckpt RUN_DIR|FILE (default: the newest run) -> (generator file, output file: --out, else eval.json beside
    it); the output is checked before any model loads: a .json file (or a new name) in a folder we may write."""
    path = sample_paths(ckpt, None, wdir, offline)[0]
    name = os.path.basename(path)
    default = "eval.json" if name == "generator.pt" else _slug(os.path.splitext(name)[0]) + "_eval.json"
    out = out or os.path.join(os.path.dirname(path), default)
    if os.path.isdir(out) or not os.path.basename(out):
        raise NadaError(f"--out {out} names a folder: eval writes its results to a .json file; choose another --out")
    if os.path.exists(out) and not read_eval(out):     # replace an earlier eval's record, and nothing else
        raise NadaError(f"--out {out} is a file other than an eval record; choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        raise NadaError(f"--out {out}: cannot write in {parent}; choose another --out")
    return path, out


def read_eval(path):
    """The record `eval` (or a study) wrote at path, or {} if there is none."""
    record = read_json(path)
    numbers = all(record.get(k) is None or type(record.get(k)) in (int, float) for k in METRICS)
    return record if set(METRICS) <= set(record) and isinstance(record.get("per_clip"), dict) and numbers else {}


def recorded(G, key, kind=str):
    """A setting the training run recorded in the checkpoint, if it is of the expected kind."""
    value = G.meta.get(key)
    return value if isinstance(value, kind) else None


def load_base(s, G, path, device):
    """The base generator to compare G with: --base, else the one the run recorded; it must share G's architecture.
    -> (its name or file, the generator)"""
    base = s.base or recorded(G, "base")
    if not base:
        raise NadaError(f"{path} records no base generator (only checkpoints written by `train` do): pass --base "
                        "NAME|FILE")
    if not s.base and not os.path.isfile(base) and base not in GENERATORS:
        raise NadaError(f"the base this run recorded ({base}) is missing: pass --base NAME|FILE")
    B = named_generator(base, s.wdir, s.offline, device, s.impl, "--base")
    check_architecture(B, G, base, path)
    return base, B


def check_architecture(B, G, base, path):
    """The base B must have the adapted G's tensors, with their shapes."""
    theirs, ours = B.state_dict(), G.state_dict()
    if theirs.keys() != ours.keys() or any(theirs[k].shape != ours[k].shape for k in ours):
        raise NadaError(f"--base {base} has another architecture than {path}: pass the generator the run adapted")


def evaluate(ckpt=None, *, clip_models=None, **settings):
    """Measure an adapted generator (a run folder or a file; default: the newest run) against its base with CLIP
    (clip_metrics) -> the JSON record, also written to `out`. settings: the other fields of EvalSettings, as
    keywords; base, src, tgt and cls default to what the run recorded. clip_models: CLIP modules already loaded."""
    s = checked(EvalSettings(ckpt=ckpt, **settings))
    rank, world, device = distributed(s.device, s.impl)
    seeds = parse_seeds(s.seeds, s.n)
    check_number("--samples", len(seeds), max(2, world))   # each process embeds some
    path, out = eval_paths(s.ckpt, s.out, s.wdir, s.offline)
    G = load_generator(path, device, s.impl)
    images = [] if s.tgt else recorded(G, "tgt_img", list) or []   # --src/--tgt, else the run's prompts or images
    src, tgt = s.src or recorded(G, "src"), s.tgt or recorded(G, "tgt")
    if not images and not (src and tgt):
        raise NadaError(f"{path} records no prompts: pass --src and --tgt")
    if not images:
        check_prompts(src, tgt)
    goal = Goal(src, None if images else tgt, [load_image(p) for p in images])
    cls = s.cls if s.cls is not None else G.meta.get("cls")
    samples = Samples(seeds, class_labels(G, cls, len(seeds)), s.trunc, s.batch)
    fetch_weights([s.base or G.meta.get("base") or ""], parse_clip(s.clip)[0] if clip_models is None else [], s.wdir,
                  s.offline)                            # all that is missing in one message
    base, B = load_base(s, G, path, device)
    names, _, models = load_clip_models(s.clip, None, device, s.wdir, s.offline, clip_models)
    if rank == 0:
        processes = f", {world} processes" if world > 1 else ""
        print(startup_line("eval", device, s.impl, path, f"base {base}", "CLIP " + ", ".join(names),
                           f"{len(seeds)} samples, truncation {s.trunc}{processes}"), flush=True)
    results = measure(B, G, models, goal, samples, device, (rank, world), s.progress and rank == 0)
    about = eval_about(samples, base, goal, recorded(G, "tgt_img", list), cls, G.meta.get("iterations"))
    record, table = eval_report(results, names, recorded(G, "clip", list) or [], **about, ckpt=os.path.abspath(path))
    if rank == 0:
        make_folder(os.path.dirname(os.path.abspath(out)))
        write_json(record, out)
        print(table + f"\nwrote {out}")
    return record


def study_settings(layers, lr, consistency):
    """--layers a,b,... (a resolution list as 16+32), --lr x,y and --consistency u,v -> their product, each a dict
    with its label (only what varies) and folder name."""
    def values(flag, spec, cast):
        try:
            return [cast(v.strip()) for v in str(spec).split(",") if v.strip()]
        except ValueError:
            raise NadaError(f"--{flag} {spec!r}: give values separated by commas") from None
    grid = dict(layers=values("layers", layers, lambda v: v.replace("+", ",")), lr=values("lr", lr, float),
                consistency=values("consistency", consistency, float))
    for flag, vals in grid.items():
        if not vals or len(set(vals)) != len(vals):
            raise NadaError(f"--{flag}: give one or more different values, separated by commas")
    settings = []
    for combo in itertools.product(*grid.values()):
        s = dict(zip(grid, combo))
        shown = [s["layers"]] + [f"{k} {s[k]:.10g}" for k in ("lr", "consistency") if len(grid[k]) > 1]
        settings.append(dict(s, label=", ".join(shown), folder=_slug("_".join(shown).replace(".", "p"), 120)))
    folders = [s["folder"] for s in settings]
    for f in (f for f in folders if folders.count(f) > 1):
        raise NadaError(f"two settings would share the folder {f!r} (their values differ too little to name apart)")
    return settings


STUDY_FILES = ("results.json", "results.md", "grid.png", "loss.png")


def study_steps(out, runs, iters):
    """Before anything loads: OUT holds only a study's files and runs, and each setting's run, if one exists,
    was started with the same settings and is not past --iters. -> the step each setting's run has reached."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NadaError(f"--out {out} is a file, not a folder; choose another --out")
    ours = set(STUDY_FILES) | {os.path.basename(r.out) for r in runs}   # and other runs, dotfiles, empty folders
    others = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else ()) if n not in ours
                    and not n.startswith(".") and not os.path.isfile(os.path.join(out, n, "config.json"))
                    and not (os.path.isdir(os.path.join(out, n)) and not os.listdir(os.path.join(out, n))))
    if others:
        raise NadaError(f"--out {out} holds other files ({', '.join(others[:3])}): a study needs a new folder or one "
                        "of its own; choose another --out")
    steps = []
    for run in runs:
        if os.path.isfile(os.path.join(run.out, "config.json")):
            old = run_config(run.out)
            if old is None:
                raise NadaError(f"{run.out}/config.json is damaged: remove {run.out} to train that setting again, or "
                                "choose another --out")
            changed = changed_setting(old, run)
            if changed:
                raise NadaError(f"{run.out} was trained with {changed}: rerun the study with the flags it was started "
                                "with, or choose another --out")
        steps.append(run_step(run.out))
        if steps[-1] > iters:
            raise NadaError(f"{run.out} is at step {steps[-1]}, past --iters {iters}: rerun the study with --iters "
                            f"{steps[-1]} or more, or choose another --out")
    return steps


Judges = namedtuple("Judges", "models names trained_with goal samples about")   # how a study measures its settings


def study(*, clip_models=None, eval_models=None, **settings):
    """Train one run per setting (the product of layers, lr and consistency lists) in OUT/<setting>/, evaluate each
    (OUT/<setting>/eval.json, as `eval` writes it), and write OUT/grid.png, loss.png, results.md and results.json.
    settings: the fields of StudySettings, as keywords. Settings already finished are skipped and interrupted
    ones resume; a setting that fails (a NaN loss) is reported and the others go on; under torchrun each process
    trains its share. clip_models, eval_models: CLIP modules already loaded (tests). -> the result rows."""
    s = checked(StudySettings(**settings))
    grid = study_settings(s.layers, s.lr, s.consistency)
    out = s.out or os.path.join("studies", run_name(s))
    shared = {f.name: getattr(s, f.name) for f in dataclasses.fields(TrainSettings)}   # each setting's run: in
    runs = [train_settings(**{**shared, "layers": g["layers"], "lr": g["lr"], "consistency": g["consistency"],
                              "out": os.path.join(out, g["folder"]), "sample_every": max(s.iters // 4, 1),
                              "save_every": max(s.iters // 10, 1)}) for g in grid]   # OUT/<setting>, checked
    steps = study_steps(out, runs, s.iters)            # every flag and folder checked before anything loads
    rank, world, device = distributed(s.device, s.impl)
    goal = Goal(s.src, None if s.tgt_img else s.tgt, [load_image(p) for p in s.tgt_img or []])   # before any model
    fetch_weights([s.ckpt], (parse_clip(s.clip)[0] if clip_models is None else []) +
                  (parse_clip(s.eval_clip, flag="--eval-clip")[0] if eval_models is None else []), s.wdir, s.offline)
    base = named_generator(s.ckpt, s.wdir, s.offline, device, s.impl).requires_grad_(False)
    for g in grid:
        parse_layers(g["layers"], base, s.auto_k)
    samples = Samples(list(range(s.n)), class_labels(base, s.cls, s.n), s.trunc, s.batch)
    names, _, models = load_clip_models(s.clip, s.clip_weights, device, s.wdir, s.offline, clip_models)
    eval_names, _, judges = load_clip_models(s.eval_clip, None, device, s.wdir, s.offline, eval_models,
                                             flag="--eval-clip")
    make_folder(out)
    if rank == 0:
        print(startup_line("study", device, s.impl, f"{len(grid)} settings", f"base {s.ckpt}",
                           f"eval CLIP {', '.join(eval_names)}, {s.n} samples", f"out {out}") +
              (f" | {world} processes" if world > 1 else ""), flush=True)
    about = eval_about(samples, runs[0].ckpt, goal, runs[0].tgt_img, s.cls, s.iters)
    judging = Judges(judges, eval_names, names, goal, samples, about)
    mine = list(zip(grid, runs, steps))[rank::world]
    rows = [study_row(run, g, step, base, device, judging, models, s.progress and rank == 0) for g, run, step in mine]
    order = [g["folder"] for g in grid]
    rows = sorted((r for part in gather(rows, world) for r in part), key=lambda r: order.index(r["folder"]))
    if rank == 0:
        write_study(out, rows, base, samples._replace(seeds=samples.seeds[:s.grid]), device, s.impl, dict(
            base=s.ckpt, src=s.src, tgt=s.tgt, tgt_img=s.tgt_img, iters=s.iters, clip=names, eval_clip=eval_names,
            n=s.n, trunc=s.trunc))
    if all(r["error"] for r in rows):
        raise NadaError(f"every setting failed; {os.path.join(out, 'results.md')} says why")
    return rows


def study_row(run, setting, step, base, device, judging, clip_models, show):
    """One setting of a study: trained (resumed where it stopped, skipped when finished), then measured unless its
    eval.json already holds this measure -> its row; a setting that fails (a NaN loss, a damaged generator.pt)
    is a row that says why, and the study goes on."""
    folder, label, error, saved = run.out, setting["label"], None, {}
    generator, report = os.path.join(folder, "generator.pt"), os.path.join(folder, "eval.json")
    try:
        if step < run.iters:
            print(f"--- {label}: training in {folder}", flush=True)
            resume = folder if os.path.isfile(os.path.join(folder, "state.pt")) else None
            train(**{**vars(run), "resume": resume, "device": device, "progress": show}, generator=base,
                  clip_models=clip_models)
        try:
            G = load_generator(generator, device, run.impl)   # a finished run's file is checked too: the grid needs it
        except NadaError as e:
            raise NadaError(f"{e}; remove {folder} to train that setting again") from None
        saved = read_eval(report)
        if {k: saved.get(k) for k in judging.about} != judging.about or saved.get("clip") != judging.names:
            results = measure(base, G, judging.models, judging.goal, judging.samples, device, show=show)
            saved = eval_report(results, judging.names, judging.trained_with, **judging.about,
                                ckpt=os.path.abspath(generator))[0]
            write_json(saved, report)
    except NadaError as e:                              # e.g. a NaN loss at a high lr: the other settings still run
        error, saved = str(e), {}
        print(f"--- {label}: failed: {error}", flush=True)
    except Interrupted:
        print("the study stopped; run the same command again to continue it (finished settings are kept)", flush=True)
        raise
    last = (read_log(folder) or [{}])[-1]
    return dict(setting=label, layers=setting["layers"], lr=setting["lr"], consistency=setting["consistency"],
                **{k: saved.get(k) for k in METRICS}, final_loss=last.get("loss"), seconds=last.get("seconds"),
                folder=setting["folder"], error=error)


def write_study(out, rows, base, samples, device, impl, about):
    """OUT/results.json, results.md, grid.png (the base row, then a row per setting, same seeds) and loss.png."""
    write_json(dict(about, results=rows), os.path.join(out, "results.json"))
    cols = ("clip_score", "directional", "diversity_ratio", "pair_similarity", "final_loss", "seconds")
    table = [f"| setting | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    table += [f"| {r['setting']} | " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    table += [f"\n{r['setting']} failed: {r['error']}" for r in rows if r["error"]]
    target = "images" if about["tgt_img"] else about["tgt"]
    title = f"# {about['src']} -> {target} on {about['base']}, {about['iters']} steps"
    note = (f"Evaluated with {', '.join(about['eval_clip'])} on {about['n']} samples (seeds 0-{about['n'] - 1}), "
            f"truncation {about['trunc']}.")
    atomic_write_text(os.path.join(out, "results.md"), "\n".join([title, "", note, "", *table, ""]))
    done = [r for r in rows if not r["error"]]         # a failed setting has no row in the grid
    with torch.no_grad():
        z = seed_latents(base, samples.seeds).to(device)
        labels = None if samples.labels is None else samples.labels[:len(samples.seeds)].to(device)
        ws = base.mapping(z, labels, samples.trunc)
        images = [base.synthesis(ws).cpu()]
        for r in done:
            G = load_generator(os.path.join(out, r["folder"], "generator.pt"), device, impl)
            images.append(G.synthesis(ws).cpu())
    draw_labelled_grid(images, ["base"] + [r["setting"] for r in done], os.path.join(out, "grid.png"))
    curves = {r["setting"]: [(e["iter"], e["loss"]) for e in read_log(os.path.join(out, r["folder"]))] for r in rows}
    draw_loss_plot(curves, os.path.join(out, "loss.png"))
    print("\n".join(table) + f"\nwrote results.md, results.json, grid.png and loss.png to {out}")


def _cell(v):
    """A number of results.md: 4 decimals, '-' where there is none."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)       # Pillow >= 10.1 scales its built-in font
    except TypeError:
        return ImageFont.load_default()


def draw_labelled_grid(rows, labels, path, across=False):
    """One row of images ([N, 3, H, W] each) per label, the label written to its left; tiles 64-256 px. across: the
    rows drawn as columns instead, each label above its column."""
    from PIL import Image, ImageDraw
    tile = min(max(rows[0].shape[-1], 128 if across else 64), 256)   # across: a label's width is a tile's
    points = max(tile // (12 if across else 6), 11)
    font = _font(points)
    margin = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(lb, font=font)) for lb in labels) + 16
    margin = points + 12 if across else margin
    cols, lines = (len(rows), len(rows[0])) if across else (len(rows[0]), len(rows))
    size = (tile * cols, margin + tile * lines) if across else (margin + tile * cols, tile * lines)
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    for r, (imgs, label) in enumerate(zip(rows, labels)):
        at = ((r + 0.5) * tile, margin // 2) if across else (8, r * tile + tile // 2)
        while across and len(label) > 4 and draw.textlength(label, font=font) > tile - 8:   # a long run name
            label = label[:-4] + "..."
        draw.text(at, label, fill="black", font=font, anchor="mm" if across else "lm")
        for c, img in enumerate(to_uint8(imgs)):
            xy = (r * tile, margin + c * tile) if across else (margin + c * tile, r * tile)
            sheet.paste(Image.fromarray(img).resize((tile, tile), Image.LANCZOS), xy)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def nice_ticks(lo, hi, n=5, least=0.0):
    """Round tick values (1, 2 or 5 times a power of ten apart, as near n of them as that allows, and at least `least`
    apart) from at most lo to at least hi."""
    lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 1e-6 else (lo, hi)   # a flat curve: a band around it
    raw = (hi - lo) / (n - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = max(min((m * power for m in (1, 2, 5, 10)), key=lambda d: abs((hi - lo) / d + 1 - n)), least)
    ticks = [k * step for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))      # and the decimals that tell them apart


def draw_dashed(draw, xy, pattern, **kw):
    """A polyline in the on/off lengths of `pattern` (pixels; () is solid), the pattern running on across vertices."""
    if not pattern:
        return draw.line(xy, **kw)
    k, left = 0, pattern[0]
    for (x0, y0), (x1, y1) in zip(xy, xy[1:]):
        length, t = math.hypot(x1 - x0, y1 - y0), 0.0
        while t < length:
            step = min(left, length - t)
            if k % 2 == 0:
                draw.line([(x0 + (x1 - x0) * t / length, y0 + (y1 - y0) * t / length),
                           (x0 + (x1 - x0) * (t + step) / length, y0 + (y1 - y0) * (t + step) / length)], **kw)
            t, left = t + step, left - step
            if left <= 0:
                k = (k + 1) % len(pattern)
                left = pattern[k]


LINE_STYLES = ((), (9, 4), (2, 3), (9, 3, 2, 3))   # solid, dashed, dotted, dash-dot: told apart in grey too
LINE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f")


def draw_loss_plot(curves, path, size=(720, 420)):
    """{label: [(step, loss)]} -> a line chart drawn with PIL: round ticks, axis names, a line style and a colour
    per curve, and a legend."""
    from PIL import Image, ImageDraw
    W, H, (left, right, top, bottom) = *size, (64, 200, 24, 40)
    points = [p for c in curves.values() for p in c if math.isfinite(p[1])] or [(0, 0.0)]
    xs, _ = nice_ticks(0, max(max(p[0] for p in points), 1), least=1)      # steps are whole
    ys, decimals = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    sx = lambda x: left + (W - left - right) * x / xs[-1]
    sy = lambda y: top + (H - top - bottom) * (ys[-1] - y) / (ys[-1] - ys[0])
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), _font(12)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for x in xs:
        draw.line([(sx(x), H - bottom), (sx(x), H - bottom + 4)], fill="black")
        draw.text((sx(x), H - bottom + 6), f"{x:.0f}", fill="black", font=font, anchor="mt")
    for y in ys:
        draw.line([(left - 4, sy(y)), (left, sy(y))], fill="black")
        draw.text((left - 6, sy(y)), f"{y:.{decimals}f}", fill="black", font=font, anchor="rm")
    draw.text(((left + W - right) / 2, H - 12), "step", fill="black", font=font, anchor="mm")
    draw.text((left, top - 6), "loss", fill="black", font=font, anchor="mb")
    for i, (label, curve) in enumerate(curves.items()):
        dashes = LINE_STYLES[i % len(LINE_STYLES)]
        style = dict(fill=LINE_COLOURS[i % len(LINE_COLOURS)], width=2 + i // len(LINE_STYLES) % 2)
        xy = [(sx(x), sy(y)) for x, y in curve if math.isfinite(y)]
        if len(xy) > 1:
            draw_dashed(draw, xy, dashes, **style)
        legend = top + 12 + 18 * i
        draw_dashed(draw, [(W - right + 10, legend), (W - right + 40, legend)], dashes, **style)
        draw.text((W - right + 46, legend), label, fill="black", font=font, anchor="lm")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------------------
# invert and edit: a photo's latent in the base generator (StyleGAN2's projector: Karras et al. 2020, "Analyzing and
# Improving the Image Quality of StyleGAN", appendix D), rendered by adapted generators, which keep the base's latents

W_JITTER, W_JITTER_UNTIL = 0.05, 0.75  # noise on w (times w's spread), fading out by 75% of the W half: a wider search
NOISE_REG = 1e5                        # weight of the noise maps' autocorrelation penalty, as in the projector
PIXEL_WEIGHT = 1.0                     # the mean squared error beside LPIPS (alone with --lpips off)
LPIPS_SIZE = 256                       # LPIPS compares images area-downsampled to at most this size
PTI_LR = 3e-4                          # pivotal tuning's Adam rate (Roich et al. 2021, arXiv 2106.05744)
W_SAMPLES = 10_000                     # latents that give the mean w and its spread
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"          # torchvision's ImageNet VGG16
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
LPIPS_FILES = {"VGG16": (VGG16_URL, "397923af", 528),   # name: url, SHA-256 (its start for torchvision's), MB
               "LPIPS": (LPIPS_URL, "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868", 0.007)}
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)   # torchvision's indices of VGG16's 13 convolutions
LPIPS_TAPS, VGG16_POOLS = (2, 4, 7, 10, 13), (2, 4, 7, 10)       # the ReLUs LPIPS reads; max-pools after these convs


class LPIPS(nn.Module):
    """LPIPS v0.1 on VGG16 (Zhang et al. 2018, arXiv 1801.03924): images [N, 3, H, W] in [-1, 1] -> distance [N]. The
    five feature maps of each image, unit-normalised over channels; their squared difference weighted per channel by
    the published calibration, averaged over the pixels, summed. Widths come from the weights (tests use a small VGG);
    `sd` holds torchvision's names (features.N.weight) and LPIPS's (linK.model.1.weight)."""

    def __init__(self, sd):
        super().__init__()
        widths = [3] + [sd[f"features.{i}.weight"].shape[0] for i in VGG16_CONVS]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1, device="meta") for i, o in zip(widths, widths[1:]))
        self.lins = nn.ParameterList(torch.empty(1, widths[k], 1, 1, device="meta") for k in LPIPS_TAPS)
        ours = {f"lins.{k}": sd[f"lin{k}.model.1.weight"] for k in range(5)}
        for j, i in enumerate(VGG16_CONVS):
            ours.update({f"convs.{j}.weight": sd[f"features.{i}.weight"], f"convs.{j}.bias": sd[f"features.{i}.bias"]})
        self.load_state_dict(ours, assign=True)         # checks every shape
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.float().requires_grad_(False).eval()

    def features(self, x):
        """The five feature maps, each unit-normalised over channels."""
        x, taps = (x - self.shift) / self.scale, []
        for k, conv in enumerate(self.convs, 1):
            x = F.relu(conv(x))
            taps += [x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10)] if k in LPIPS_TAPS else []
            x = F.max_pool2d(x, 2) if k in VGG16_POOLS else x
        return taps

    def forward(self, a, b):
        """a, b: images, or (b) the features of images already computed (a fixed target)."""
        fb = b if isinstance(b, list) else self.features(b)
        return sum(F.conv2d((fa - f).square(), lin).mean((1, 2, 3))
                   for fa, f, lin in zip(self.features(a), fb, self.lins))


def load_lpips(spec, device, wdir=None, offline=False):
    """--lpips: off -> None; auto -> torchvision's VGG16 and LPIPS's calibration, downloaded into the weights folder;
    FILE -> one state dict holding both. Read as data, as every checkpoint, and only the tensors LPIPS uses."""
    if check_lpips(spec) == "off":
        return None
    paths = [spec] if spec != "auto" else [resolve_lpips(name, wdir, offline) for name in LPIPS_FILES]
    sd = {}
    try:
        for path in paths:
            with TorchFile(path) as tf:
                obj = tf.load()
                sd.update(tf.build({k: v for k, v in obj.items() if str(k).startswith(("features.", "lin"))}))
        lpips = LPIPS(sd)
    except Exception as e:
        raise NadaError(f"--lpips {spec}: not the weights of LPIPS on VGG16 ({_refusal(e)[:200]}); use auto, off, or "
                        "a state dict of features.N.weight/bias (torchvision's VGG16) and linK.model.1.weight"
                        ) from None
    return lpips.to(device)


def resolve_lpips(name, wdir=None, offline=False):
    """One of LPIPS_FILES by name, downloaded into the weights folder on first use -> its path."""
    url, sha256, _ = LPIPS_FILES[name]
    return download(url, weights_path(url, wdir), sha256=sha256, offline=offline)


def check_lpips(spec):
    if spec not in ("auto", "off") and not os.path.isfile(spec):
        raise NadaError(f"--lpips {spec}: no such file; use auto (LPIPS on VGG16, downloaded once), off, or a file")
    return spec


def w_spread(G, device, seed=0):
    """The mean w [1, 1, w_dim] of G's mapping and the spread of w around it (root mean squared distance), from
    W_SAMPLES latents."""
    z = torch.randn(W_SAMPLES, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        w = G.style[1:](normalize_2nd_moment(z))                                      # [W_SAMPLES, w_dim]
    mean = w.mean(0)
    return mean.view(1, 1, -1), (w - mean).square().sum(1).mean().sqrt().item()


def lr_ramp(t, up=0.05, down=0.25):
    """The projector's rate factor at fraction t of a half: linear warm-up over `up`, cosine ramp-down over `down`."""
    return min(1.0, t / up) * (0.5 - 0.5 * math.cos(math.pi * min(1.0, (1 - t) / down)))


def noise_penalty(noise):
    """The noise maps' autocorrelation one pixel across and down, at every scale down to 8x8 (appendix D): it keeps
    the optimiser from drawing the photo into the noise. noise: [N, 1, r, r] per layer -> [N]"""
    total = 0
    for n in noise:
        while True:
            total = total + (n * n.roll(1, 3)).mean((1, 2, 3)).square() + (n * n.roll(1, 2)).mean((1, 2, 3)).square()
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return total


def lpips_size(x):
    """LPIPS compares images of at most LPIPS_SIZE px: larger ones are area-downsampled."""
    return F.interpolate(x, size=LPIPS_SIZE, mode="area") if x.shape[-1] > LPIPS_SIZE else x


def photo_target(images, lpips=None):
    """What every step compares G's images with, computed once: the photos [N, 3, S, S] and, with LPIPS, their
    features (the photos do not change, so neither do their features)."""
    with torch.no_grad():
        return images, lpips.features(lpips_size(images)) if lpips is not None else None


def reconstruction_loss(img, target, lpips=None):
    """How far G's images are from the photos (`photo_target`), [N, 3, S, S] -> [N]: LPIPS at <= 256 px, plus the
    mean squared error times PIXEL_WEIGHT."""
    pixels, features = target
    loss = PIXEL_WEIGHT * (img - pixels).square().mean((1, 2, 3))
    return loss + lpips(lpips_size(img), features) if lpips is not None else loss


def inversion_step(G, w, noise, opt, target, lpips, jitter, rng):
    """One step of the projector: render w (plus `jitter` x N(0, I)) with the noise maps, and step both along the
    reconstruction loss and the noise penalty; the maps are then made zero-mean, unit-variance again.
    -> (the ws rendered [N, num_ws, w_dim], their reconstruction loss [N]) before the step"""
    ws = (w + jitter * torch.randn(w.shape, generator=rng).to(w.device) if jitter else w).expand(-1, G.num_ws, -1)
    rec = reconstruction_loss(G.synthesis(ws, noise=noise), target, lpips)
    opt.zero_grad(set_to_none=True)
    (rec + NOISE_REG * noise_penalty(noise)).sum().backward()
    opt.step()
    with torch.no_grad():
        for n in noise:
            n -= n.mean((1, 2, 3), keepdim=True)
            n /= n.square().mean((1, 2, 3), keepdim=True).sqrt()
    return ws.detach(), rec.detach()


def invert(G, images, steps=INVERT_STEPS, lr=INVERT_LR, lpips=None, seed=0, show=True):
    """The latents that G (unconditional) renders as `images` [N, 3, S, S] in [-1, 1], S = G.size: from the mean w,
    one w per image for the first half of the steps (W), then one per layer (W+), the noise maps optimised beside
    them. Each image keeps the ws and noise of its lowest reconstruction loss; Ctrl-C stops early with those.
    -> dict(ws [N, num_ws, w_dim], noise [N, 1, r, r] per layer, loss [N], steps done, interrupted)"""
    if G.c_dim:
        raise NadaError("inverting into a class-conditional generator is not supported; use an unconditional one")
    device, N = images.device, len(images)
    w_avg, w_std = w_spread(G, device, seed)
    rng = torch.Generator().manual_seed(seed)
    noise = [n.to(device).requires_grad_() for n in G.make_noise(N, rng, "cpu")]
    best = dict(ws=w_avg.expand(N, G.num_ws, -1), noise=[n.detach().clone() for n in noise],
                loss=torch.full((N,), math.inf, device=device))
    w, done, interrupted, grads = w_avg.expand(N, 1, -1), 0, False, [p.requires_grad for p in G.parameters()]
    G.requires_grad_(False)
    progress, target = Progress("invert", steps, show=show), photo_target(images, lpips)
    try:
        for half, length in ((1, steps // 2), (G.num_ws, steps - steps // 2)):
            w = w.detach().expand(-1, half, -1).clone().requires_grad_()              # [N, 1 | num_ws, w_dim]
            opt = torch.optim.Adam([w, *noise], lr=lr, betas=(0.9, 0.999))
            for i in range(length):
                t = i / length
                for group in opt.param_groups:
                    group["lr"] = lr * lr_ramp(t)
                jitter = w_std * W_JITTER * max(0.0, 1 - t / W_JITTER_UNTIL) ** 2 if half == 1 else 0.0
                maps = [n.detach().clone() for n in noise]
                ws, rec = inversion_step(G, w, noise, opt, target, lpips, jitter, rng)
                better = rec < best["loss"]
                best = dict(ws=torch.where(better[:, None, None], ws, best["ws"]),   # one assignment: Ctrl-C
                            noise=[torch.where(better[:, None, None, None], m, b) for m, b in zip(maps, best["noise"])],
                            loss=torch.minimum(rec, best["loss"]))                  # never splits ws from noise
                done += 1
                progress.update(loss=f"{rec.mean().item():.4f}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        for p, g in zip(G.parameters(), grads):
            p.requires_grad_(g)
    return dict(best, steps=done, interrupted=interrupted)


def pivotal_tuning(G, ws, noise, images, steps, lpips=None, lr=PTI_LR, show=True):
    """A copy of G whose synthesis weights are tuned to render `ws` (with `noise`) as `images` (pivotal tuning,
    Roich et al. 2021): the latent found by `invert` stays put and the generator moves to meet the photo."""
    T = copy.deepcopy(G).requires_grad_(False)
    tuned = [p for name, p in T.named_parameters() if not name.startswith(("style.", "embed."))]
    opt = torch.optim.Adam([p.requires_grad_() for p in tuned], lr=lr)
    progress, target = Progress("pivotal tuning", steps, show=show), photo_target(images, lpips)
    for _ in range(steps):
        loss = reconstruction_loss(T.synthesis(ws, noise=noise), target, lpips).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(loss=f"{loss.item() / len(ws):.4f}")
    progress.close()
    return T.requires_grad_(False)


def moved_by(tuned, base, adapted):
    """`tuned` plus the change a run made to `base`, weight by weight: the run's domain on a pivotally tuned base.
    An approximation (the run learned its change around the base's weights, not the tuned ones)."""
    out, t, b = copy.deepcopy(adapted), tuned.state_dict(), base.state_dict()
    out.load_state_dict({k: v + t[k] - b[k] if v.is_floating_point() else v for k, v in adapted.state_dict().items()})
    return out


def load_photo(path, size):
    """A photo -> [1, 3, size, size] in [-1, 1]: its centre square, resized (load_image checks the file first)."""
    img = load_image(path, short=size)                  # the short side at most `size`: a smaller photo grows below
    H, W = img.shape[2:]
    top, left, side = (H - min(H, W)) // 2, (W - min(H, W)) // 2, min(H, W)
    img = img[:, :, top:top + side, left:left + side]
    return img if side == size else F.interpolate(img, size=size, mode="bicubic", antialias=True).clamp(-1, 1)


def photo_stems(paths, flag="--img", suffix=""):
    """Each file's name without its extension (or `suffix`): the outputs' names, which must differ."""
    stems = [os.path.basename(p)[:-len(suffix)] if suffix and p.endswith(suffix) else
             os.path.splitext(os.path.basename(p))[0] for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise NadaError(f"{flag}: two files named {twice[0]} (their outputs would share names); rename one")
    return stems


def run_names(paths):
    """Each run's name in edit's outputs: its folder's name, or its file's stem. They must differ, and differ from
    the names of edit's own files."""
    names = [os.path.basename(os.path.dirname(os.path.realpath(p))) if os.path.basename(p) == "generator.pt" else
             os.path.splitext(os.path.basename(p))[0] for p in paths]
    for name in names:
        if names.count(name) > 1 or name in ("recon", "edit", "pti", "latent"):
            named = "two runs are named" if names.count(name) > 1 else "a run is named"
            raise NadaError(f"--ckpt: {named} {name}, and edit names its outputs STEM.<run>.png: copy its generator.pt "
                            "to a file of another name and pass that")
    return names


def check_photos(s):
    """What can be checked before any download: each --img opens as an image, --lpips names something, --out is no
    run's folder."""
    if is_run_folder(s.out):
        raise NadaError(f"--out {s.out} is a run's or a study's folder: invert and edit write into one of their own "
                        "(the default is inversions/); choose another --out")
    for path in s.img or ():
        load_image(path, short=16)
    check_lpips(s.lpips)


def check_unconditional(G, what):
    if G.c_dim:
        raise NadaError(f"{what} is class-conditional ({G.c_dim} classes); invert and edit need an unconditional one")


def base_key(base, wdir=None):
    """A base as runs record it (a name or a file) -> the file it stands for, to compare two runs' bases."""
    if is_model_name(base):
        return os.path.realpath(weights_path(GENERATORS[base][0], wdir))
    return os.path.realpath(base)


def read_latent(path, G, base_sha256=None):
    """A STEM.latent.pt -> (ws [1, num_ws, w_dim], noise [1, 1, r, r] per layer, the record), checked against G and,
    where the file records its base, against base_sha256."""
    if not os.path.exists(path):
        raise NadaError(f"{path}: no such file")
    try:
        with TorchFile(path) as tf:
            record = tf.build(tf.load())
    except Exception as e:
        raise NadaError(f"{path}: not a latent file ({_refusal(e)})") from None
    ws, noise = (record.get(k) if isinstance(record, dict) else None for k in ("ws", "noise"))
    if not (torch.is_tensor(ws) and isinstance(noise, list) and all(torch.is_tensor(n) for n in noise)):
        raise NadaError(f"{path}: not a latent file of `nada.py invert` (a dict with ws and noise)")
    if tuple(ws.shape) != (G.num_ws, G.w_dim) or [n.shape for n in noise] != [b.shape[1:] for b in G.noises.buffers()]:
        raise NadaError(f"{path}: a latent of a generator with {' x '.join(map(str, ws.shape))} ws, but this base has "
                        f"{G.num_ws} x {G.w_dim} (or other noise maps): invert the photo again with this base")
    if base_sha256 and record.get("base_sha256") not in (None, base_sha256):
        raise NadaError(f"{path}: a latent found in {record.get('base')}, not in this base (the same architecture, "
                        "other weights): invert the photo again with this base")
    return ws[None].float(), [n[None].float() for n in noise], record


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (`timeout`, a job's time limit) stops an inversion as Ctrl-C does: with the best latents written."""
    def stop(signum, _):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:                                  # not the main thread: signals are left alone
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def inverted(G, photos, stems, s, lpips, base, device):
    """Invert the photos [(path, [1, 3, S, S])] s.batch at a time, and write STEM.latent.pt and STEM.recon.png for each
    into s.out; Ctrl-C or SIGTERM writes the best found so far, then stops. base: dict(base=its name, base_sha256).
    -> {stem: (ws, noise)}"""
    found = {}
    for i in range(0, len(photos), s.batch):
        batch, names = torch.cat([img for _, img in photos[i:i + s.batch]]).to(device), stems[i:i + s.batch]
        with sigterm_as_ctrl_c():
            r = invert(G, batch, s.steps, s.lr, lpips, s.seed, s.progress)
        with torch.no_grad():
            recon = G.synthesis(r["ws"], noise=r["noise"]).cpu()
        for j, ((path, _), stem) in enumerate(zip(photos[i:i + s.batch], names)):
            atomic_save(dict(ws=r["ws"][j].float().cpu(), noise=[n[j].float().cpu() for n in r["noise"]],
                             loss=float(r["loss"][j]), steps=r["steps"], interrupted=r["interrupted"], lr=s.lr,
                             lpips=s.lpips, seed=s.seed, image=os.path.abspath(path), image_sha256=sha256_of(path),
                             **base), os.path.join(s.out, f"{stem}.latent.pt"))
            save_image(recon[j:j + 1], os.path.join(s.out, f"{stem}.recon.png"))
            found[stem] = r["ws"][j:j + 1], [n[j:j + 1] for n in r["noise"]]
        losses = ", ".join(f"{x:.4f}" for x in r["loss"].tolist())
        print(f"wrote {', '.join(f'{n}.latent.pt' for n in names)} and the reconstructions to {s.out} "
              f"({'pixel' if lpips is None else 'LPIPS + pixel'} loss {losses}, {r['steps']} steps)", flush=True)
        if r["interrupted"]:
            print(f"interrupted at step {r['steps']} of {s.steps}: the best latents so far are written", flush=True)
            raise Interrupted(130)
    return found


def invert_photos(img=None, ckpt="ffhq", **settings):
    """`nada.py invert`: each photo's latent in a generator, written to `out` as STEM.latent.pt (a dict: ws [num_ws,
    w_dim], noise, base, the photo's SHA-256, steps, loss) and STEM.recon.png. settings: InvertSettings' fields."""
    s = checked(InvertSettings(img=[img] if isinstance(img, (str, os.PathLike)) else img, ckpt=ckpt, **settings))
    if s.dry_run:
        return invert_dry_run(s)
    if not s.img:
        raise NadaError("pass --img PHOTO [PHOTO ...]: the photos to invert")
    stems, device = photo_stems(s.img), check_device(s.device, s.impl)
    check_photos(s)
    fetch_weights([s.ckpt], [], s.wdir, s.offline, lpips=s.lpips == "auto")
    G = named_generator(s.ckpt, s.wdir, s.offline, device, s.impl)
    check_unconditional(G, s.ckpt)
    photos = [(p, load_photo(p, G.size)) for p in s.img]
    lpips = load_lpips(s.lpips, device, s.wdir, s.offline)
    path = resolve_ckpt(s.ckpt, s.wdir, True)
    base = dict(base=os.path.abspath(s.ckpt) if os.path.exists(s.ckpt) else s.ckpt, base_sha256=sha256_of(path))
    make_folder(s.out)
    print(startup_line("invert", device, s.impl, path, *about_inversion(s, G)), flush=True)
    inverted(G, photos, stems, s, lpips, base, device)
    return s.out


def about_inversion(s, G):
    """The startup line's account of an inversion."""
    photos = f"{len(s.img)} photo{'s' * (len(s.img) > 1)}"
    return (f"{photos}, centre-cropped to {G.size} px (face generators expect faces aligned as FFHQ's)",
            f"{s.steps} steps, LPIPS {s.lpips}" + (f", pivotal tuning {s.pti} steps" if getattr(s, "pti", 0) else ""))


def edit(img=None, ckpt=None, latents=None, **settings):
    """`nada.py edit`: photos (or saved latents) rendered by adapted generators of one base: in `out`, STEM.<run>.png
    per run and STEM.edit.png (input | reconstruction | each run, labelled). A photo is inverted into the base, or its
    STEM.latent.pt there reused when it was made from the same bytes and base with at least as many steps and the same
    --lpips. settings: EditSettings' fields."""
    listed = lambda x: [x] if isinstance(x, (str, os.PathLike)) else x
    s = checked(EditSettings(img=listed(img), ckpt=listed(ckpt), latents=listed(latents), **settings))
    if not s.ckpt or bool(s.img) == bool(s.latents):
        raise NadaError("pass --ckpt RUN [RUN ...] and either --img PHOTO [...] or --latents FILE [...]")
    if s.pti and not s.img:
        raise NadaError("--pti tunes the base to a photo: pass --img")
    stems = photo_stems(s.img) if s.img else photo_stems(s.latents, "--latents", ".latent.pt")
    device = check_device(s.device, s.impl)
    check_photos(s)
    paths = [resolve_ckpt(c, s.wdir, s.offline) for c in s.ckpt]
    names, runs = run_names(paths), [load_generator(p, device, s.impl) for p in paths]
    bases = {base_key(recorded(G, "base"), s.wdir) for G in runs if recorded(G, "base")}
    if len(bases) > 1 and not s.base:
        raise NadaError(f"--ckpt: these runs adapt different bases ({', '.join(sorted(bases))}): edit one base's runs "
                        "at a time")
    fetch_weights([s.base or recorded(runs[0], "base") or ""], [], s.wdir, s.offline)
    base, B = load_base(s, runs[0], paths[0], device)
    for G, path in zip(runs[1:], paths[1:]):
        check_architecture(B, G, base, path)
    check_unconditional(B, f"the base {base}")
    base = dict(base=base, base_sha256=sha256_of(resolve_ckpt(base, s.wdir, True)))
    found = {stem: read_latent(f, B, base["base_sha256"])[:2] for stem, f in zip(stems, s.latents or ())}
    photos = {stem: load_photo(p, B.size) for stem, p in zip(stems, s.img or ())}
    found.update({stem: reusable(os.path.join(s.out, f"{stem}.latent.pt"), p, B, base, s) for stem, p in
                  zip(stems, s.img or ())})
    todo = [stem for stem in stems if found[stem] is None]
    if todo or s.pti:                                   # LPIPS's files only when something is to be optimised
        fetch_weights([], [], s.wdir, s.offline, lpips=s.lpips == "auto")
    lpips = load_lpips(s.lpips, device, s.wdir, s.offline) if todo or s.pti else None
    make_folder(s.out)
    about = about_inversion(s, B) if s.img else [f"{len(s.latents)} latent{'s' * (len(s.latents) > 1)}"]
    print(startup_line("edit", device, s.impl, f"base {base['base']}", f"runs {', '.join(names)}", *about), flush=True)
    found.update(inverted(B, [(p, photos[st]) for st, p in zip(stems, s.img or ()) if st in todo], todo, s, lpips, base,
                          device))
    for stem in stems:
        render_edits(stem, found[stem], photos.get(stem), B, runs, names, s, device, lpips)
    return s.out


def reusable(path, photo, G, base, s):
    """A STEM.latent.pt made from the photo's bytes in this base, not interrupted, with at least s.steps steps and
    the same --lpips -> (ws, noise); else None: invert again, and replace it."""
    if not os.path.isfile(path):
        return None
    try:
        ws, noise, r = read_latent(path, G, base["base_sha256"])
        why = [why for why, differs in (("made from another photo", r.get("image_sha256") != sha256_of(photo)),
                                        (f"made with --lpips {r.get('lpips')}", r.get("lpips") != s.lpips),
                                        ("cut short", r.get("interrupted") is not False),
                                        (f"made in {r.get('steps')} steps", not (type(r.get("steps")) is int
                                                                                and r["steps"] >= s.steps))) if differs]
    except NadaError as e:                              # another base's, or unreadable
        why = [_first_line(e).split(": ", 1)[-1]]
    if why:
        print(f"inverting again, and replacing {path}: {why[0]} (edit reuses a latent of the same photo and base, "
              f"--lpips {s.lpips}, at least {s.steps} steps, not cut short)", flush=True)
        return None
    print(f"reusing {path} (the same photo and base, {r['steps']} steps, loss {r.get('loss', math.nan):.4f}; "
          "delete it to invert again)", flush=True)
    return ws, noise


@torch.no_grad()
def render_edits(stem, latent, photo, B, runs, names, s, device, lpips=None):
    """A latent rendered by the base and each run -> STEM.<run>.png each, and STEM.edit.png: input | reconstruction |
    runs, labelled. With --pti the base is first tuned to the photo (STEM.pti.png: its rendering), and each run is
    the tuned base plus the run's change to B."""
    ws, noise = latent[0].to(device), [n.to(device) for n in latent[1]]
    base, label = B, "reconstruction"
    if s.pti:
        with torch.enable_grad():
            base, label = pivotal_tuning(B, ws, noise, photo.to(device), s.pti, lpips, show=s.progress), "PTI"
        runs = [moved_by(base, B, G) for G in runs]
    recon = base.synthesis(ws, noise=noise).cpu()
    edits = [G.synthesis(ws, noise=noise).cpu() for G in runs]
    if s.pti:
        save_image(recon, os.path.join(s.out, f"{stem}.pti.png"))
    for name, img in zip(names, edits):
        save_image(img, os.path.join(s.out, f"{stem}.{name}.png"))
    columns, labels = [recon, *edits], [label, *names]
    if photo is not None:
        columns, labels = [photo, *columns], ["input", *labels]
    draw_labelled_grid(columns, labels, os.path.join(s.out, f"{stem}.edit.png"), across=True)
    print(f"wrote {stem}.edit.png and {len(names)} edit{'s' * (len(names) > 1)} to {s.out}", flush=True)


def invert_dry_run(s):
    """The memory of an inversion on s.device, counted on the meta device: one photo batch, VGG16's LPIPS."""
    device = check_device(s.device, here=False)
    G = meta_generator(s.ckpt, s.wdir).requires_grad_(False)
    check_unconditional(G, s.ckpt)
    widths = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    with torch.device("meta"):
        sd = {f"lin{k}.model.1.weight": torch.empty(1, widths[t - 1], 1, 1) for k, t in enumerate(LPIPS_TAPS)}
        for i, o, n in zip(VGG16_CONVS, widths, (3, *widths)):
            sd.update({f"features.{i}.weight": torch.empty(o, n, 3, 3), f"features.{i}.bias": torch.empty(o)})
        lpips = None if s.lpips == "off" else LPIPS(sd).to("meta")
        w = torch.zeros(s.batch, G.num_ws, G.w_dim, requires_grad=True)
        noise, images = [n.requires_grad_() for n in G.make_noise(s.batch)], torch.zeros(s.batch, 3, G.size, G.size)
    opt = torch.optim.Adam([w, *noise])
    e = estimate_memory(lambda: inversion_step(G, w, noise, opt, photo_target(images, lpips), lpips, 0.0, None),
                        [G] + [lpips] * (lpips is not None), opt)
    print_estimate(e, f"nada invert --dry-run | device {device} | {G.size} px, batch {s.batch}, LPIPS {s.lpips}",
                   device, f"the generator{' and LPIPS VGG16' * (lpips is not None)}", "Adam's moments of ws and noise")
    return e


# ----------------------------------------------------------------------------------------------------------
# dry run: the memory a run needs, counted on the meta device (shapes, no data) over the real setup and steps

CUDA_CONTEXT = 2 ** 29                 # ~0.5 GiB that the CUDA context and kernels take on top, a stated constant
CLIP_ARCHITECTURES = {  # embed, resolution, vision layers, vision width, patch, text width, heads, text layers
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 8, 12), "ViT-B/16": (512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12, 12), "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12, 12),
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 512, 8, 12), "RN101": (512, 224, (3, 4, 23, 3), 64, None, 512, 8, 12),
}


def free_gpu_bytes(device):
    """Free memory on the GPU, or None where there is no GPU to ask."""
    return torch.cuda.mem_get_info(torch.device(device))[0] if torch.cuda.is_available() else None


def choose_memory(s, device, G):
    """--memory auto -> low exactly when fast's estimated peak (plus the CUDA context) exceeds the free GPU memory;
    G: the base generator, already loaded. -> (mode, why), why for the startup line."""
    if s.memory != "auto":
        return s.memory, "as asked"
    if not device.startswith("cuda"):
        return "fast", "on the CPU"
    need = dry_run(dataclasses.replace(s, memory="fast", device=device), G)["peak_bytes"] + CUDA_CONTEXT
    free = free_gpu_bytes(device)
    if free is None:
        return "fast", f"needs {need / 2 ** 30:.1f} GiB; no GPU here to compare"
    if not G.latent_avg.is_meta:                        # a run: the base and the CUDA context are held (and in `need`)
        free += torch.cuda.memory_reserved(device) + CUDA_CONTEXT
    return ("low" if need > free else "fast"), f"fast needs {need / 2 ** 30:.1f} GiB, {free / 2 ** 30:.1f} GiB free"


def dry_run(s, generator=None):
    """What a run of settings `s` needs on s.device (a GPU need not be here): the run's own setup and two of its steps
    on the meta device, counted by estimate_memory; nothing is downloaded or written. generator: the base, if it is
    loaded already. -> a dict of bytes"""
    device = check_device(s.device, here=False)
    t = prepare(s, device, None if s.memory == "auto" else s.memory, meta=True, generator=generator)
    return dict(estimate_memory(t.step, [t.G_frozen, t.G, *t.models], t.opt), device=device, memory=t.memory,
                why=t.why or "as asked")


def meta_twin(G):
    """G's architecture on the meta device, with its metadata."""
    with torch.device("meta"):
        twin = Generator(**G.config())
    twin.meta = G.meta
    return twin


def meta_generator(ckpt, wdir=None):
    """The generator on the meta device: a file's own tensor shapes, or a named model's architecture, as NVIDIA's
    train.py configures them: channel_base 32768 (16384 for the 256 px paper256 models), channel_max 512, 8 mapping
    layers (2 for cifar10)."""
    if ckpt not in GENERATORS or os.path.isfile(ckpt):
        return named_generator(ckpt, wdir, True, "meta")
    _, res, _, classes = GENERATORS[ckpt]
    base = 16384 if res == 256 else 32768
    with torch.device("meta"):
        return Generator(res, n_mlp=2 if ckpt == "cifar10" else 8, c_dim=len(classes or ()),
                         channels={2 ** k: min(base // 2 ** k, 512) for k in range(2, int(math.log2(res)) + 1)})


def meta_clip(name, device="meta", wdir=None, offline=True):
    """A CLIP model on the meta device: a named model's known architecture, or a file's own tensors."""
    if os.path.isfile(name):
        return load_clip(name, "meta")
    if name not in CLIP_ARCHITECTURES:
        raise NadaError(f"--dry-run knows the CLIP models {', '.join(CLIP_ARCHITECTURES)}; for {name!r} give its file")
    embed, res, layers, width, patch, text_width, heads, text_layers = CLIP_ARCHITECTURES[name]
    with torch.device("meta"):
        model = _import_clip().model.CLIP(embed, res, layers, width, patch, 77, 49408, text_width, heads, text_layers)
    return model.float().eval().requires_grad_(False)


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of live tensor storage after every op, and their peak. A storage is live while a tensor
    that uses it is (autograd keeps what it saves alive), so this is what an exact allocator would hold."""

    def __init__(self, tensors=()):
        super().__init__()
        self.storages, self.now, self.peak = {}, 0, 0  # storage key -> [bytes, live tensors using it]
        for t in tensors:
            self.track(t)

    def track(self, t):
        storage = t.untyped_storage()
        entry = self.storages.setdefault(storage._cdata, [storage.nbytes(), 0])
        self.now += entry[0] if entry[1] == 0 else 0
        entry[1] += 1
        weakref.finalize(t, self.release, storage._cdata)

    def release(self, key):
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= self.storages.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.peak = max(self.peak, self.now)
        return out


def replay_modes():
    """torch.utils.checkpoint's context_fn: a layer recomputed in backward runs under the torch function modes of its
    forward (such as the dry run's MetaAutocast), which autograd does not carry into backward by itself."""
    modes = torch.overrides._get_current_function_mode_stack()

    @contextlib.contextmanager
    def within():
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            yield
    return contextlib.nullcontext(), within()


class MetaAutocast(torch.overrides.TorchFunctionMode):
    """bfloat16 autocast for the dry run: torch.autocast does not act on meta tensors, so train_step's autocast() turns
    on CPU autocast there as a flag, and while it is on, the functions that autocast computes in bfloat16 get their
    float32 tensors cast first, above autograd: the casts and what autograd saves are counted as on a GPU. The flag
    is what torch.utils.checkpoint restores when --memory low recomputes a layer, so the recomputation agrees. A
    function mode is off while it handles a call, so calls inside one PyTorch writes in Python (CLIP's attention, which
    runs under autocast only in --layers auto's selection) stay float32: there the count errs high."""
    LOWER = {F.conv2d, F.conv_transpose2d, F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
             torch.mm, torch.bmm, torch.addmm, torch.baddbmm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.LOWER and torch.is_autocast_enabled("cpu"):
            args, kwargs = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t: t.to(torch.bfloat16) if t.dtype == torch.float32 else t, (args, kwargs))
        return func(*args, **(kwargs or {}))


def estimate_memory(step, modules, opt, steps=2):
    """Run `steps` training steps on meta tensors and count: weights (both generators and the CLIP models),
    Adam's state, and the peak. Two steps, as Adam's state appears in the first. -> dict of bytes, seconds"""
    t0 = time.time()
    meta = any(p.is_meta for m in modules for p in m.parameters())           # real tensors: real autocast alone
    with LiveBytes(t for m in modules for t in itertools.chain(m.parameters(), m.buffers())) as live, \
            MetaAutocast() if meta else contextlib.nullcontext():
        weights = live.now
        for _ in range(steps):
            step()
    optimizer = sum(v.untyped_storage().nbytes() for state in opt.state.values() for v in state.values()
                    if torch.is_tensor(v) and v.ndim)
    return dict(peak_bytes=live.peak, weights_bytes=weights, optimizer_bytes=optimizer,
                activation_bytes=live.peak - weights - optimizer, cuda_context_bytes=CUDA_CONTEXT,
                seconds=time.time() - t0)


# ----------------------------------------------------------------------------------------------------------
# models, doctor and the kernels: the named generators, what this machine has, the CUDA ops' build

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


def list_models(wdir=None):
    folder = weights_dir(wdir)
    print(f"weights folder: {folder}")
    print(f"{'name':<12} {'px':>5} {'size':>8}  {'status':<11} url")
    for name, (url, res, mb, classes) in GENERATORS.items():
        path = weights_path(url, wdir)
        here = os.path.isfile(path)
        size = f"{os.path.getsize(path) / 2 ** 20:.0f} MB" if here else f"~{mb} MB"
        extra = f"  (conditional: {len(classes)} classes)" if classes else ""
        print(f"{name:<12} {res:>5} {size:>8}  {'downloaded' if here else '-':<11} {url}{extra}")
    print("CLIP models (--clip): " + ", ".join(f"{n} ({mb} MB)" for n, mb in CLIP_MB.items()) + "; downloaded into "
          "the same folder on first use")
    print("LPIPS (invert and edit, --lpips auto): " + ", ".join(f"{n} {os.path.basename(url)} (~{mb} MB)" for n, (
        url, _, mb) in LPIPS_FILES.items()) + "; downloaded into the same folder on first use")


def doctor(device="auto", build_ops=False, wdir=None):
    """Print the environment; -> 0 when everything the chosen device needs is there, else 1."""
    cuda = torch.cuda.is_available()
    ok = cuda or device != "cuda"
    print(f"python       {sys.version.split()[0]}")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"GPU          {torch.cuda.get_device_name(0) if cuda else 'none visible'}"
          + ("" if ok else ": --device cuda needs a CUDA build of torch and a driver"))
    try:
        _import_clip()
        print("CLIP         clip-anytorch importable")
    except Exception as e:
        ok = False
        print(f"CLIP         MISSING: {_first_line(e)} (pip install -r requirements.txt)")
    folder = weights_dir(wdir)
    present = sorted(f for f in os.listdir(folder) if f.endswith((".pkl", ".pt"))) if os.path.isdir(folder) else []
    print(f"CPU threads  {torch.get_num_threads()}, OpenMP waits "
          f"{os.environ.get('OMP_WAIT_POLICY', 'as it likes (spinning, then sleeping)')}")
    print(f"weights      {folder} ({len(present)} files{': ' + ', '.join(present) if present else ''})")
    build = ops_build()                                 # the toolkit, ninja and the builds: ops/build.py reports them
    if build is None:
        print("ops          no ops/ folder beside nada.py: the reference ops run")
    ok = (build is None or build.doctor(build_ops)) and ok
    print(f"ops path     {ops_status('cpu' if device == 'cuda' and not cuda else check_device(device))}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------
# command line: a subcommand per settings record, a flag per setting

COMMANDS = dict(train=TrainSettings, sample=SampleSettings, eval=EvalSettings, study=StudySettings,
                invert=InvertSettings, edit=EditSettings, models=Common, doctor=DoctorSettings)
# each record's docstring: its line in --help, then its description


def build_parser():
    """The command line: a subcommand per record, a flag per setting with help, typed by the record's annotation. A
    flag that is not typed stays out of the parsed arguments (argparse.SUPPRESS), so the record's default applies,
    or, for `train --resume`, the run's own setting."""
    p = argparse.ArgumentParser(prog="nada.py", description=__doc__.split("\n\n")[0].strip())
    commands = p.add_subparsers(dest="cmd", required=True)
    for cmd, record in COMMANDS.items():
        summary, _, description = record.__doc__.partition("\n\n")
        c = commands.add_parser(cmd, help=summary, description=description.strip() or summary)
        for f in (f for f in dataclasses.fields(record) if f.metadata["help"] and f.name not in record.hidden):
            cli = dict(f.metadata["cli"])
            names = cli.pop("flags", ("--" + f.name.replace("_", "-"),))
            if f.type is bool:
                cli["action"] = "store_true"
            elif f.type is not list:
                cli["type"] = f.type
            help = record.helps.get(f.name, f.metadata["help"])
            shown = "" if f.default is None or f.default is False or "default" in help else f" (default: {f.default})"
            c.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=help + shown, **cli)
    return p


def run_command(cmd, args):
    """One command with the flags typed -> its exit code."""
    if environment()[0] > 1 and cmd not in ("eval", "study"):
        raise NadaError(f"`{cmd}` runs in one process; torchrun shares out the work of `eval` and `study`")
    if cmd == "doctor":
        s = DoctorSettings(**args)
        return doctor(s.device, s.build_ops, s.wdir)
    if cmd == "models":
        list_models(Common(**args).wdir)
    elif cmd == "train" and args.get("dry_run"):
        e = train(**args)
        print_estimate(e, f"nada train --dry-run | device {e['device']} | memory {e['memory']} ({e['why']})",
                       e["device"], "both generators and the CLIP models' image towers", "Adam's two moments of the "
                       "trained weights")
    else:
        dict(train=train, sample=sample, eval=evaluate, study=study, invert=invert_photos, edit=edit)[cmd](**args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()                     # under torchrun, every process done before any leaves
    return 0


def print_estimate(e, title, device, weights, optimizer):
    """A dry run's figures (estimate_memory's dict), each with what it counts."""
    gib = lambda b: f"{b / 2 ** 30:6.2f} GiB"
    print(f"{title} | estimated on the meta device in {e['seconds']:.1f} s")
    print(f"  weights      {gib(e['weights_bytes'])}   {weights}")
    print(f"  optimizer    {gib(e['optimizer_bytes'])}   {optimizer}")
    print(f"  activations  {gib(e['activation_bytes'])}   the peak of a step above those, gradients included")
    context = f"   + the CUDA context, about {gib(CUDA_CONTEXT).strip()}: needs " \
              f"{gib(e['peak_bytes'] + CUDA_CONTEXT).strip()} free on the GPU"
    print(f"  peak         {gib(e['peak_bytes'])}" + (context if device.startswith("cuda") else ""))


def main(argv=None):
    """The command line -> exit code: 0 done, 1 doctor found a problem, 2 bad input (one line on stderr),
    128 + N stopped by signal N (the run saved first)."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv]))
    try:
        return run_command(args.pop("cmd"), args)
    except NadaError as e:
        print(f"nada: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:           # the CPU allocator, CUDA calls and cuDNN raise plain
        if not isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) and not re.search(   # RuntimeErrors:
                r"out of memory|can't allocate memory", str(e)):                                # their text tells
            raise
        print(f"nada: error: out of memory ({_first_line(e)[:160]}); lower --batch, --n-sample or --n, or use a "
              "smaller model", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return e.args[0] if isinstance(e, Interrupted) else 130
    except BrokenPipeError:                             # the reader (`| head`) has gone: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if "WORLD_SIZE" in os.environ and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
