"""torch.library registrations for nada's compiled ops: fake (meta) functions, so torch.compile traces them without
running them, and the autograd formulas, so autograd and torch.compile see one op per call instead of an opaque
autograd.Function. build.py's load_op runs register(op) right after it loads the op's library; `import nada`
never imports this file.

- upfirdn2d: linear, so its gradient is another upfirdn2d (the filter flipped, up and down swapped, the padding
  mirrored onto the output's grid), and gradients of any order work.
- bias_act: the gradient is rebuilt from the output y alone, by nada::bias_act_backward, which also sums the bias
  gradient in the accumulation type. First order only: differentiating it raises.
"""

import torch

_registered = set()


def register(op):
    """Register op's fake functions and autograd formula, once per process."""
    if op not in _registered:
        {"bias_act": _register_bias_act, "upfirdn2d": _register_upfirdn2d}[op]()
        _registered.add(op)


def upfirdn2d_out_size(H, W, fh, fw, up, down, px0, px1, py0, py1):
    """Output height and width (the shape rule in the docstring of `upfirdn2d` in nada.py)."""
    return (H * up + py0 + py1 - fh) // down + 1, (W * up + px0 + px1 - fw) // down + 1


def _register_upfirdn2d():
    @torch.library.register_fake("nada::upfirdn2d")
    def _(x, f, up, down, px0, px1, py0, py1, flip, gain):
        N, C, H, W = x.shape
        oh, ow = upfirdn2d_out_size(H, W, f.shape[0], f.shape[1], up, down, px0, px1, py0, py1)
        torch._check(oh >= 1 and ow >= 1, lambda: "upfirdn2d: the padded, upsampled input is smaller than the filter")
        # The kernel's rule (upfirdn2d.cpp, upfirdn2d_channels_last): channels_last iff channels are innermost.
        cl = C > 1 and x.stride(1) < x.stride(3)
        return torch.empty((N, C, oh, ow), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last if cl else torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        x, f, up, down, px0, px1, py0, py1, flip, gain = inputs
        ctx.save_for_backward(f)
        ctx.args = (x.shape[2], x.shape[3], up, down, px0, py0, flip, gain)

    def backward(ctx, dy):
        # The adjoint: swap up and down, flip the filter, pad so that the result lands exactly on H x W.
        (f,) = ctx.saved_tensors
        H, W, up, down, px0, py0, flip, gain = ctx.args
        if ctx.needs_input_grad[1]:
            raise RuntimeError("nada upfirdn2d: the filter has no gradient")
        fh, fw = f.shape
        oh, ow = dy.shape[2], dy.shape[3]
        pad = (fw - px0 - 1, W * up - ow * down + px0 - up + 1, fh - py0 - 1, H * up - oh * down + py0 - up + 1)
        dx = torch.ops.nada.upfirdn2d(dy, f, down, up, *pad, not flip, gain)
        return dx, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd("nada::upfirdn2d", backward, setup_context=setup_context)


def _register_bias_act():
    @torch.library.register_fake("nada::bias_act")
    def _(x, b, lrelu, alpha, gain, clamp):
        return torch.empty_like(x)                      # x is dense: same strides, as at::empty_like gives

    @torch.library.register_fake("nada::bias_act_backward")
    def _(dy, y, lrelu, alpha, gain, clamp, db_dtype):
        db = torch.empty((y.shape[1] if db_dtype is not None else 0,), device=y.device,
                         dtype=db_dtype if db_dtype is not None else y.dtype)
        return torch.empty_like(y), db

    @torch.library.register_fake("nada::bias_act_grad")
    def _(dy, y, lrelu, alpha, gain, clamp):
        return torch.empty_like(y)

    def setup_context(ctx, inputs, output):
        x, b, lrelu, alpha, gain, clamp = inputs
        ctx.save_for_backward(output)                   # the gradient is rebuilt from the output alone
        ctx.args = (lrelu, alpha, gain, clamp)
        ctx.b_dtype = None if b is None else b.dtype

    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        db_dtype = ctx.b_dtype if ctx.needs_input_grad[1] else None
        dx, db = torch.ops.nada.bias_act_backward(dy, y, *ctx.args, db_dtype)
        return dx, db if db_dtype is not None else None, None, None, None, None

    torch.library.register_autograd("nada::bias_act", backward, setup_context=setup_context)

    def refuse(ctx, *grads):
        raise RuntimeError("nada bias_act: the compiled op has first-order gradients only; use impl='ref' for "
                           "higher orders")

    for name in ("bias_act_backward", "bias_act_grad"):
        torch.library.register_autograd(f"nada::{name}", refuse, setup_context=lambda ctx, inputs, output: None)
