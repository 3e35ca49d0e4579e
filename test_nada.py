"""Tests for nada.py, CPU first, in the order of nada.py's sections. Run: python -m pytest -q"""

import http.server
import itertools
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # as nada.py's CLI does, before torch loads OpenMP

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nada

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")             # the reference checkpoints and outputs (fixtures/README.md)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- fixtures and helpers -----------------------------------------------------------------------------------

def run_cli(*args, cwd=HERE, env=None, timeout=600):
    """Run nada.py in a subprocess -> (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "nada.py"), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    return p.returncode, p.stdout, p.stderr


def assert_clean_error(rc, err, *words):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("nada: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


def tiny_generator(seed=0, size=32, impl="ref"):
    torch.manual_seed(seed)
    G = nada.Generator(size, style_dim=32, n_mlp=2, channels={4: 32, 8: 32, 16: 32, 32: 16, 64: 16}, impl=impl)
    with torch.no_grad():
        G.latent_avg = G.mapping(torch.randn(512, 32))[:, 0].mean(0)
    return G


def make_colour_clip(path, K=20.0, C=5.0, const=0.01):
    """A CLIP (its real architecture, loaded through clip.load) whose embeddings mean something: the image
    embedding reads an image's mean colour and the text embedding reads the words red, green and blue.

    Both transformers average their tokens (q = k = 0, v = out = identity, MLP off); channels 0-2 carry colour,
    3-5 its negative (so LayerNorm sees zero mean) and 6-7 a large constant pair that keeps LayerNorm near linear.
    Projections put R, G, B on embedding axes 0-2 and a small constant on axis 3.
    """
    nada._import_clip()                                   # quietly: clip-anytorch warns on import
    from clip.model import CLIP
    from clip.simple_tokenizer import SimpleTokenizer
    m = CLIP(embed_dim=64, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
             context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    sd = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
    eye = torch.eye(64)
    for pre in ("visual.transformer.resblocks.0.", "transformer.resblocks.0."):
        sd[pre + "attn.in_proj_weight"][128:] = eye
        sd[pre + "attn.out_proj.weight"] = eye.clone()
        sd[pre + "ln_1.weight"] = sd[pre + "ln_2.weight"] = torch.ones(64)
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[ln + ".weight"] = torch.ones(64)
    for c in range(3):
        sd["visual.conv1.weight"][c, c] = 1 / 256         # mean over the 16x16 patch
        sd["visual.conv1.weight"][3 + c, c] = -1 / 256
        sd["visual.proj"][c, c] = sd["text_projection"][c, c] = 1
    sd["visual.proj"][6, 3] = sd["text_projection"][6, 3] = const
    sd["visual.positional_embedding"][:, 6], sd["visual.positional_embedding"][:, 7] = K, -K
    sd["token_embedding.weight"][:, 6], sd["token_embedding.weight"][:, 7] = K, -K
    tok = SimpleTokenizer()
    for c, word in enumerate(("red", "green", "blue")):
        (i,) = tok.encode(word)
        sd["token_embedding.weight"][i, c] += C
        sd["token_embedding.weight"][i, 3 + c] -= C
    torch.save(sd, path)
    return str(path)


@pytest.fixture(scope="session")
def colour_clip(tmp_path_factory):
    return make_colour_clip(tmp_path_factory.mktemp("clip") / "colour_clip.pt")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "tiny.pt"
    nada.save_generator(tiny_generator(), path)
    return str(path)


def redness(img, channel):
    """How much the given channel exceeds the mean of the other two."""
    others = [c for c in range(3) if c != channel]
    return (img[:, channel] - img[:, others].mean(1)).mean().item()


def train_args(tmp_path, colour_clip, tiny_ckpt):
    """A quick, valid `train` command line writing to tmp_path/ok (tests add or override flags)."""
    return ["train", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--tgt", "red photo", "--iters", 2, "--out",
            tmp_path / "ok"]                               # the colour CLIP sees no change from photo to sketch


def _layouts(x):
    """The same values as NCHW-contiguous, channels_last and a non-contiguous view."""
    wide = torch.zeros(*x.shape[:3], x.shape[3] * 2, dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return {"nchw": x, "channels_last": x.to(memory_format=torch.channels_last), "strided": wide[..., ::2]}


def _persistent_pickle(path, G_meta, extra=None):
    """Write a pickle the way NVIDIA's persistence does: GLOBAL torch_utils.persistence._reconstruct_persistent_obj."""
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called while writing")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Obj:
        def __init__(self, meta):
            self.meta = meta

        def __reduce__(self):
            return (_reconstruct_persistent_obj, (self.meta,))

    def wrap(rec):
        state = dict(rec.state)
        state["_modules"] = {k: wrap(v) for k, v in rec.state.get("_modules", {}).items()}
        return Obj(dict(type="class", version=6, module_src="# placeholder", class_name=rec.class_name, state=state))
    sys.modules.setdefault("torch_utils", types.ModuleType("torch_utils"))
    sys.modules["torch_utils.persistence"] = mod
    try:
        with open(path, "wb") as f:
            pickle.dump({**{k: wrap(v) for k, v in (extra or {}).items()}, "G_ema": wrap(G_meta)}, f)
    finally:
        del sys.modules["torch_utils.persistence"], sys.modules["torch_utils"]


class _Server:
    """A tiny HTTP server on 127.0.0.1 serving `files`; with cut=True the first response breaks off halfway."""

    def __init__(self, files, cut=False, ranges=True):
        self.files, self.cut, self.ranges, self.requests = files, cut, ranges, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append((name, self.headers.get("Range")))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data, start = outer.files[name], 0
                rng = self.headers.get("Range")
                if rng and outer.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if outer.cut:
                    outer.cut = False
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- ops (reference) ----------------------------------------------------------------------------------------

def upfirdn2d_naive(x, f, up, down, pad, flip_filter=False, gain=1.0):
    """The op's definition written out the long way: explicit zero insertion, pad/crop, conv2d, subsample."""
    N, C, H, W = x.shape
    u = torch.zeros(N, C, H * up, W * up, dtype=x.dtype)
    u[:, :, ::up, ::up] = x
    x0, x1, y0, y1 = pad
    p = F.pad(u, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    p = p[:, :, max(-y0, 0):p.shape[2] - max(-y1, 0), max(-x0, 0):p.shape[3] - max(-x1, 0)]
    k = f if flip_filter else f.flip([0, 1])
    out = torch.stack([F.conv2d(p[:, c:c + 1], (k * gain)[None, None].to(x.dtype)) for c in range(C)], 1)[:, :, 0]
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, (2, 1, 2, 1)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)),
                                         (2, 2, (0, 3, 1, 2)), (3, 1, (-1, 2, 0, -2)), (1, 1, (-2, -1, 0, 0))])
def test_upfirdn2d_ref_matches_definition(up, down, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    f = torch.rand(4, 3, dtype=torch.float64)             # asymmetric: a flip mistake shows
    for flip in (False, True):
        ours = nada.upfirdn2d(x, f, up, down, pad, flip_filter=flip, gain=1.5, impl="ref")
        ref = upfirdn2d_naive(x, f, up, down, pad, flip, 1.5)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < 1e-12


def test_upfirdn2d_ref_gradcheck():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    f = torch.rand(4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: nada.upfirdn2d(t, f, 2, 1, (2, 1, 2, 1), impl="ref"), (x,))
    assert torch.autograd.gradcheck(lambda t: nada.upfirdn2d(t, f, 1, 2, (1, 1, 1, 1), impl="ref"), (x,))


def test_bias_act_ref_matches_definition_and_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = nada.bias_act(x, b, "lrelu", gain=nada.SQRT2, clamp=0.7, impl="ref")
    expected = (F.leaky_relu(x + b.view(1, 5, 1, 1), 0.2) * nada.SQRT2).clamp(-0.7, 0.7)
    assert torch.equal(y, expected)
    assert torch.equal(nada.bias_act(x, None, impl="ref"), x)
    assert torch.autograd.gradcheck(lambda t, c: nada.bias_act(t, c, "lrelu", gain=1.3, impl="ref"), (x, b))


def test_impl_choice_errors_are_clear():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        nada.bias_act(x, impl="cuda")
    with pytest.raises(ValueError, match="impl must be"):
        nada.upfirdn2d(x, nada.make_kernel(), impl="fast")


def test_import_compiles_nothing_and_nada_py_alone_runs_on_the_reference_ops(tmp_path):
    """nada.py copied alone imports, reports why the kernels are off and renders; no import builds anything."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(HERE, "nada.py"), alone)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "NADA_OPS_CACHE": str(tmp_path / "ops_cache")}
    loaded = ("print(sorted(m for m in sys.modules\n"
              "             if m == 'nada_ops_build' or m.startswith('torch.utils.cpp_extension')))")
    code = ("import os, sys, torch, nada\n"
            "assert nada.__file__ == os.path.join(os.getcwd(), 'nada.py'), nada.__file__\n"
            "reason = 'no ops/ folder beside nada.py'\n"
            "assert nada.load_op('upfirdn2d') == (None, reason), nada.load_op('upfirdn2d')\n"
            "status = nada.ops_status('cuda')\n"
            "assert all(op in status for op in nada.OPS) and status.count(reason) == len(nada.OPS), status\n"
            "torch.manual_seed(0)\n"
            "G = nada.Generator(8, style_dim=8, n_mlp=1, channels={4: 8, 8: 8})\n"
            "with torch.no_grad():\n"
            "    img = G(torch.randn(2, 8))\n"
            "assert img.shape == (2, 3, 8, 8) and torch.isfinite(img).all() and img.std() > 0\n" + loaded)
    p = subprocess.run([sys.executable, "-c", code], cwd=alone, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout
    assert os.listdir(alone) == ["nada.py"]               # wrote nothing beside itself
    # beside ops/, importing still builds nothing: ops/build.py is read at the first CUDA use of an op
    p = subprocess.run([sys.executable, "-c", "import sys, nada\n" + loaded], cwd=HERE, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "[]", (p.stdout, p.stderr)
    assert not (tmp_path / "ops_cache").exists()


# ---- ops: the compiled kernels (CPU twins of the CUDA kernels here; the GPU itself where there is one) --------

@pytest.fixture(scope="session")
def compiled_ops():
    """Build both extensions (nvcc and a CUDA build of torch suffice, no GPU needed) or skip."""
    for op in nada.OPS:
        ops, reason = nada.load_op(op, require_gpu=False)
        if ops is None:
            if os.environ.get("CI"):
                pytest.fail(f"the CUDA ops must build in CI: {reason}")
            pytest.skip(f"CUDA ops not built here: {reason}")
    return torch.ops.nada


OP_CASES = [(1, 1, (2, 1, 2, 1), 4, 4), (2, 1, (2, 1, 2, 1), 4, 4), (1, 2, (1, 1, 1, 1), 4, 4), (2, 1, (1, 1, 1, 1), 4, 4),
            (2, 2, (0, 3, 1, 2), 4, 3), (3, 1, (-1, 2, 0, -2), 5, 2), (1, 1, (-1, -1, 0, 0), 3, 3), (1, 4, (0, 0, 0, 0), 1, 7)]


@pytest.mark.parametrize("up,down,pad,fh,fw", OP_CASES)
def test_upfirdn2d_kernel_math_matches_reference(compiled_ops, up, down, pad, fh, fw):
    torch.manual_seed(0)
    f = torch.rand(fh, fw)
    for name, x in _layouts(torch.randn(2, 3, 7, 9, dtype=torch.float64)).items():
        for flip in (False, True):
            y = compiled_ops.upfirdn2d(x, f, up, down, *pad, flip, 1.5)
            ref = nada._upfirdn2d_ref(x, f.double(), up, down, pad, flip, 1.5)
            assert y.shape == ref.shape and (y - ref).abs().max() < 1e-12, name
            if name == "channels_last":
                assert y.is_contiguous(memory_format=torch.channels_last)


def test_upfirdn2d_kernel_backward_formula(compiled_ops):
    """The CUDA autograd Function (its adjoint-as-upfirdn2d padding) checked through the CPU twin."""
    f = torch.rand(4, 3, dtype=torch.float32)
    for up, down, pad, _, _ in OP_CASES[:6]:
        x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
        fn = lambda t: nada._upfirdn2d_cuda(t, f, up, down, pad, False, 2.0)
        assert torch.autograd.gradcheck(fn, (x,)), (up, down, pad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_bias_act_kernel_math_and_gradient(compiled_ops, dtype):
    torch.manual_seed(0)
    for name, x in _layouts(torch.randn(2, 5, 4, 3).to(dtype)).items():
        b = torch.randn(5).to(dtype)
        if name == "strided":                             # the op wants dense input; the wrapper makes it so
            with pytest.raises(RuntimeError, match="must be dense"):
                compiled_ops.bias_act(x, b, True, 0.2, nada.SQRT2, 0.7)
            x = x.contiguous()
        y = compiled_ops.bias_act(x, b, True, 0.2, nada.SQRT2, 0.7)
        xr = x.double().requires_grad_(True)
        ref = nada._bias_act_ref(xr, b.double(), "lrelu", 0.2, nada.SQRT2, 0.7)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert (y.double() - ref).abs().max() < tol, name
        dy = torch.randn_like(x)
        ref.backward(dy.double())
        dx = compiled_ops.bias_act_grad(dy, y, True, 0.2, nada.SQRT2, 0.7)
        # rebuilt from the rounded y: skip samples that round onto the clamp itself
        ok = (ref.detach().abs() - 0.7).abs() > 1e-2
        assert ((dx.double() - xr.grad).abs() * ok).max() < tol * 10, name
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, c: nada._bias_act_cuda(t, c, True, 0.2, 1.3, -1.0), (x, b))


def test_op_loader_remembers_failure_and_never_retries(monkeypatch, tmp_path):
    calls = []

    def broken(op, home):
        calls.append(op)
        raise RuntimeError("nvcc exploded\nfoo.cu:1: error: something specific")
    build = nada.ops_build()
    monkeypatch.setattr(build, "build_op", broken)
    monkeypatch.setattr(build, "cuda_home", lambda: str(tmp_path))
    monkeypatch.setattr(nada.torch.version, "cuda", "13.0")
    build.load_op.cache_clear()
    try:
        with pytest.warns(UserWarning, match="unavailable"):
            ops, reason = nada.load_op("upfirdn2d", require_gpu=False)
        assert ops is None and "error: something specific" in reason
        assert nada.load_op("upfirdn2d", require_gpu=False) == (None, reason) and calls == ["upfirdn2d"]
    finally:
        build.load_op.cache_clear()


def test_stale_lock_does_not_hang(tmp_path):
    """The build lock is an flock: a killed holder releases it, so a leftover lock file never blocks."""
    lock = tmp_path / "x.lock"
    p = subprocess.Popen([sys.executable, "-c", "import fcntl, time, sys; f = open(sys.argv[1], 'a'); "
                          "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(lock)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(TimeoutError):
        with nada.ops_build().file_lock(str(lock), timeout=1):
            pass
    p.kill()
    p.wait()
    t0 = time.time()
    with nada.ops_build().file_lock(str(lock), timeout=5):
        pass
    assert time.time() - t0 < 2


def test_cuda_home_follows_an_nvcc_wrapper(tmp_path, monkeypatch):
    real = tmp_path / "cuda-x"
    (real / "bin").mkdir(parents=True)
    (real / "lib64").mkdir()
    (real / "bin" / "nvcc").write_text("")
    (real / "lib64" / "libcudart.so.13").write_text("")
    wrapper = tmp_path / "wbin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    assert nada.ops_build().cuda_home() == str(real)
    monkeypatch.setenv("CUDA_HOME", str(real))
    assert nada.ops_build().cuda_home() == str(real)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_upfirdn2d_parity(dtype):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    shapes = [(2, 3, 7, 9), (1, 16, 33, 33), (3, 64, 64, 64), (1, 3, 128, 128)]
    for up, down, pad, fh, fw in OP_CASES:
        f = torch.rand(fh, fw, device="cuda")
        f = f / f.sum()
        for shape in shapes:
            for name, x in _layouts(torch.randn(*shape, device="cuda")).items():
                x = x.to(dtype).requires_grad_(True)
                y = nada.upfirdn2d(x, f, up, down, pad, gain=2.0, impl="cuda")
                x64 = x.detach().double().requires_grad_(True)
                ref = nada._upfirdn2d_ref(x64, f.double(), up, down, pad, False, 2.0)
                err = (y.double() - ref).abs().max().item()
                assert err <= tol, (up, down, pad, shape, name, err)
                dy = torch.randn_like(y)
                y.backward(dy)
                ref.backward(dy.double())
                gerr = (x.grad.double() - x64.grad).abs().max().item()
                assert gerr <= tol * 4, (up, down, pad, shape, name, gerr)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_bias_act_parity(dtype):
    torch.manual_seed(0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for shape in [(2, 5, 7, 9), (4, 512, 16, 16), (1, 64, 257, 3), (3, 7)]:
        x0 = torch.randn(*shape, device="cuda") * 2
        for name, x in (_layouts(x0) if x0.ndim == 4 else {"2d": x0}).items():
            b = torch.randn(shape[1], device="cuda")
            for act, clamp in (("lrelu", 1.5), ("linear", None), ("lrelu", None)):
                xc = x.to(dtype).requires_grad_(True)
                y = nada.bias_act(xc, b.to(dtype), act, gain=nada.SQRT2, clamp=clamp, impl="cuda")
                x64 = xc.detach().double().requires_grad_(True)
                ref = nada._bias_act_ref(x64, b.to(dtype).double(), act, 0.2, nada.SQRT2, clamp)
                assert (y.double() - ref).abs().max() <= tol * max(1, ref.abs().max().item()), (shape, name, act)
                dy = torch.randn_like(y)
                y.backward(dy)
                ref.backward(dy.double())
                ok = (ref.detach().abs() - (clamp or 1e9)).abs() > 1e-2
                assert ((xc.grad.double() - x64.grad).abs() * ok).max() <= tol * 10, (shape, name, act)


@cuda
def test_gpu_generator_cuda_matches_ref_and_second_order_gradients():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    G = tiny_generator(size=64).cuda()
    z = torch.randn(3, 32, device="cuda")
    imgs, grads = [], []
    for impl in ("ref", "cuda"):
        G.set_impl(impl)
        G.zero_grad()
        img = G(z, noise_mode="const")
        img.square().mean().backward()
        imgs.append(img.detach())
        grads.append(torch.cat([p.grad.flatten() for p in G.parameters() if p.grad is not None]))
    assert (imgs[0] - imgs[1]).abs().max() < 1e-4
    assert (grads[0] - grads[1]).abs().max() < 1e-4 * grads[0].abs().max()
    # upfirdn2d's gradient is another upfirdn2d, so its second order matches the reference; bias_act refuses it.
    x = torch.randn(1, 2, 8, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    second = []
    for impl in ("ref", "cuda"):
        y = nada.upfirdn2d(x, nada.make_kernel().cuda(), up=2, pad=(2, 1, 2, 1), impl=impl)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        second.append(torch.autograd.grad(g.square().sum(), x)[0])
    assert (second[0] - second[1]).abs().max() < 1e-10
    (g,) = torch.autograd.grad(nada.bias_act(x, None, "lrelu", impl="cuda").square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        g.sum().backward()


# Kernels v2 (issue 10): the CPU twins run the kernels' own block code (ops/*.h), block by block and phase by phase,
# so these sweeps exercise the tiles, their zero-filled borders, the tile loop and the 2x2 quads on the CPU.
UFD_FILTERS = [(4, 4), (3, 3), (1, 1), (2, 5), (4, 3), (5, 4)]
UFD_PADS = [(0, 0, 0, 0), (2, 1, 2, 1), (1, 1, 1, 1), (-1, 2, 0, -2), (3, 0, 1, 2), (1, 2, 1, 2)]
UFD_SHAPES = [(1, 2, 1, 1), (2, 3, 7, 9), (1, 2, 5, 2), (1, 1, 1, 6), (1, 1, 33, 70)]


@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (1, 3), (4, 1), (1, 4), (3, 2)])
def test_upfirdn2d_kernel_sweep_matches_reference(compiled_ops, up, down):
    """Every filter, pad, flip and layout, 1-pixel and odd images; 4x4 with up 2/down 2/neither: the small kernels."""
    torch.manual_seed(0)
    checked = 0
    for (fh, fw), pad, shape in itertools.product(UFD_FILTERS, UFD_PADS, UFD_SHAPES):
        if (shape[2] * up + pad[2] + pad[3] < fh) or (shape[3] * up + pad[0] + pad[1] < fw):
            continue                                    # no valid output: the op refuses it (tested below)
        f = torch.rand(fh, fw)
        for name, x in _layouts(torch.randn(*shape, dtype=torch.float64)).items():
            for flip in (False, True):
                y = compiled_ops.upfirdn2d(x, f, up, down, *pad, flip, 1.5)
                ref = nada._upfirdn2d_ref(x, f.double(), up, down, pad, flip, 1.5)
                assert y.shape == ref.shape and (y - ref).abs().max() < 1e-12, (fh, fw, pad, shape, name, flip)
                checked += 1
    assert checked > 500


@pytest.mark.parametrize("up,down,pad,shape", [
    (1, 1, (2, 1, 2, 1), (1, 2, 150, 140)),     # blur: 3 tile columns, 10 tile rows, 2 per block
    (1, 1, (1, 2, 1, 2), (1, 1, 260, 20)),      # 17 tile rows, 4 per block, the last block partly empty
    (2, 1, (2, 1, 2, 1), (1, 2, 70, 70)),       # up 2: 140 x 140 outputs
    (2, 1, (1, 2, 1, 2), (2, 1, 37, 41)),       # odd pad: the tiles start one output early (phase alignment)
    (1, 2, (1, 1, 1, 1), (1, 2, 300, 150)),     # down 2: 130 x 34 input tiles
    (2, 2, (0, 3, 1, 2), (1, 1, 90, 60)),       # the generic kernel: 8-row tiles, several per block
])
def test_upfirdn2d_kernel_tiles_and_tile_loop(compiled_ops, up, down, pad, shape):
    torch.manual_seed(1)
    f = torch.rand(4, 4)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for name, x in _layouts(torch.randn(*shape, dtype=dtype)).items():
            y = compiled_ops.upfirdn2d(x, f, up, down, *pad, False, 2.0)
            ref = nada._upfirdn2d_ref(x.double(), f.double(), up, down, pad, False, 2.0)
            assert (y.double() - ref).abs().max() < tol, (name, dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_upfirdn2d_kernel_half_dtypes_accumulate_in_float32(compiled_ops, dtype, tol):
    torch.manual_seed(0)
    f = nada.make_kernel()
    for up, down, pad in ((1, 1, (2, 1, 2, 1)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)), (3, 1, (1, 1, 1, 1))):
        x = torch.randn(2, 3, 19, 21).to(dtype)
        y = compiled_ops.upfirdn2d(x, f, up, down, *pad, False, float(up * up))
        ref = nada._upfirdn2d_ref(x.double(), f.double(), up, down, pad, False, float(up * up))
        assert y.dtype == dtype and ((y.double() - ref).abs() / (ref.abs() + 1)).max() < tol, (up, down)


def test_upfirdn2d_kernel_gradients_of_every_order(compiled_ops):
    """The registered gradient is another upfirdn2d, so gradcheck and gradgradcheck hold; the filter has none."""
    f = torch.rand(4, 3)
    for up, down, pad, _, _ in OP_CASES[:6]:
        x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
        fn = lambda t: nada._upfirdn2d_cuda(t, f, up, down, pad, True, 2.0)
        assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,)), (up, down, pad)
    with pytest.raises(RuntimeError, match="filter has no gradient"):
        nada._upfirdn2d_cuda(x, f.double().requires_grad_(True), 1, 1, (1, 1, 1, 1), False, 1.0).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 7), (2, 1, 3, 3), (4, 64, 16, 16), (2, 16, 9), (2, 3, 4, 5, 6),
                                   (6, 16)])
def test_bias_act_kernel_layouts_dy_strides_and_bias_gradient(compiled_ops, dtype, shape):
    """Vector and scalar paths (a vector of one channel, or of V channels: inner 1), every dense layout, no bias, dy
    in another layout or expanded, db summed per channel."""
    torch.manual_seed(0)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    x0 = torch.randn(*shape) * 2
    layouts = {"nchw": x0, "last": x0.movedim(1, -1).contiguous().movedim(-1, 1)}
    b = torch.randn(shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for (name, x), act in itertools.product(layouts.items(), ("lrelu", "linear")):
        x = x.to(dtype)
        y = compiled_ops.bias_act(x, b, act == "lrelu", 0.2, 1.4, 1.5)
        assert y.stride() == x.stride(), name
        xr, br = x.double().requires_grad_(True), b.double().requires_grad_(True)
        ref = nada._bias_act_ref(xr, br, act, 0.2, 1.4, 1.5)
        assert (y.double() - ref).abs().max() < tol * 2, (name, act)
        unbiased = nada._bias_act_ref(x.double(), None, act, 0.2, 1.4, 1.5)
        assert (compiled_ops.bias_act(x, None, act == "lrelu", 0.2, 1.4, 1.5).double() - unbiased).abs().max() < tol * 2
        for dy in (torch.randn(shape).to(dtype), torch.randn(shape).to(dtype).movedim(0, -1).contiguous().movedim(-1, 0),
                   torch.full((), 0.5, dtype=dtype).expand(shape)):
            dx, db = compiled_ops.bias_act_backward(dy, y, act == "lrelu", 0.2, 1.4, 1.5, b.dtype)
            gx, gb = torch.autograd.grad(ref, (xr, br), dy.double(), retain_graph=True)
            ok = (ref.detach().abs() - 1.5).abs() > 1e-2           # y rounded onto the clamp: either side is right
            assert ((dx.double() - gx).abs() * ok).max() < tol * 10, (name, act, dy.stride())
            if ok.all():
                assert db.dtype == b.dtype and (db.double() - gb).abs().max() < tol * 10 * gx[:, 0].numel()


def test_bias_act_kernel_channel_of_size_one_with_stride_zero(compiled_ops):
    """Defect 2: such a tensor is dense, and its channel stride 0 used to divide by zero (SIGFPE)."""
    x = torch.randn(2, 1, 3, 5).as_strided((2, 1, 3, 5), (15, 0, 5, 1))
    b = torch.tensor([0.25])
    y = compiled_ops.bias_act(x, b, True, 0.2, 2.0, -1.0)
    assert torch.equal(y, nada._bias_act_ref(x, b, "lrelu", 0.2, 2.0, None))
    dx, db = compiled_ops.bias_act_backward(torch.ones_like(y), y, True, 0.2, 2.0, -1.0, torch.float32)
    assert torch.equal(db, dx.sum().reshape(1))


def test_bias_act_kernel_bias_gradient_sums_in_float32(compiled_ops):
    """Defect 4: 92,682 float16 ones summed in float16 overflow to inf; the kernel sums in float32 and returns
    the bias gradient in the bias's dtype (nada's biases are float32 parameters)."""
    x = torch.ones(2, 3, 46341, dtype=torch.float16, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    nada._bias_act_cuda(x, b, False, 0.2, 1.0, -1.0).sum().backward()
    assert b.grad.dtype == torch.float32 and b.grad.tolist() == [92682.0] * 3
    assert x.grad.dtype == torch.float16 and bool((x.grad == 1).all())


# Kernels v3 (issue 20): the bias gradient's accuracy and buffer, the leaky ReLU's side of values that round to
# zero, one limit for the CPU twin and the GPU.

def test_bias_act_kernel_bias_gradient_has_no_long_float32_running_sums(compiled_ops):
    """Issue 20, item 2. Adding n terms one after another to a float32 running sum loses up to about n * 2^-24
    relative (2^31 terms of 1.25 came out 4% low). The loss grows with the length of the longest float32 running
    sum, not with the tensor, so a short tensor whose sum used to run long shows it as well as 2^31 elements do:
    [4096, 3] puts 4096 rows in one channel column, one row group each, and the old combine added those 4096
    partial sums in float32 (4.1e-5 high). Now each thread adds in float64 (float32 only within one vector of at
    most 8 elements) and so does everything after: the error stays within 64 * 2^-24 relative (a bound kept from
    the first fix, which still ran 64 rows in float32) whatever the size. The second case is a channel wider than
    many blocks with an odd inner size (the old buffer: 4 bytes per element; now a few float64s per warp's 32
    columns)."""
    bound = 64 * 2.0 ** -24
    x = torch.ones(4096, 3, dtype=torch.float32)
    g = torch.full_like(x, 1.1)
    _, db = compiled_ops.bias_act_backward(g, x, False, 1.0, 1.0, -1.0, torch.float32)
    exact = g.double().sum(0)
    assert ((db.double() - exact).abs() / exact).max() <= bound, db.tolist()
    n = 2 ** 21 + 1
    y = torch.ones(2, 1, n, dtype=torch.float16)
    dy = torch.full((2, 1, n), 0.1, dtype=torch.float16)
    dx, db = compiled_ops.bias_act_backward(dy, y, False, 1.0, 1.0, -1.0, torch.float32)
    exact = dy.double().sum().item()
    assert abs(db.item() - exact) <= bound * exact and torch.equal(dx, dy), (db.item(), exact)


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (2, 700, 4, 6)), (torch.float32, (3, 50, 8, 40)),
                                         (torch.float16, (3, 50, 8, 40)), (torch.float32, (16, 96, 5, 16)),
                                         (torch.float16, (16, 96, 5, 16)), (torch.float32, (2, 65536))])
def test_bias_act_kernel_bias_gradient_across_windows_and_channels(compiled_ops, dtype, shape):
    """The bias gradient's bookkeeping: a block walks several windows of 256 vectors, stepping each thread's channel
    and its place in it from one window to the next (here with a remainder, so the steps wrap), a warp's 32 vectors
    span several channels (3 vectors per channel in the first shape) or two, rows come in several groups (the
    16-row shapes), and inner-1 vectors of 8 channels (the last). db must be the sum of the kernel's own dx per
    channel."""
    torch.manual_seed(0)
    y = torch.randn(shape).to(dtype)
    dy = torch.randn(shape).to(dtype)
    dx, db = compiled_ops.bias_act_backward(dy, y, True, 0.2, 1.4, -1.0, torch.float32)
    dims = [0] + list(range(2, len(shape)))
    exact = dx.double().sum(dims)
    scale = dx.double().abs().sum(dims)
    tol = 1e-6 if dtype == torch.float32 else 2e-3          # float16: db adds dx before its rounding to float16
    assert ((db.double() - exact).abs() <= tol * scale + 1e-12).all(), (db - exact).abs().max()
    assert torch.equal(dx, compiled_ops.bias_act_grad(dy, y, True, 0.2, 1.4, -1.0))


@pytest.mark.parametrize("dtype,b,gain", [(torch.float16, 2.98e-8, 1.0), (torch.float16, 1e-8, nada.SQRT2),
                                          (torch.bfloat16, 1e-41, 1.0), (torch.float32, 2.0 ** -149, 0.5)])
def test_bias_act_kernel_side_of_values_that_round_to_zero(compiled_ops, dtype, b, gain):
    """Issue 20, item 3: x + b > 0 whose output rounds to 0 takes the gradient of the positive side (gain), not
    alpha * gain; x + b < 0 or == 0 the negative side. The output's zero carries the side in its sign."""
    x = torch.zeros(2, 3, 1, 1, dtype=dtype)
    bias = torch.tensor([b, -b, 0.0], dtype=torch.float32)
    y = compiled_ops.bias_act(x, bias, True, 0.2, gain, -1.0)
    ref = nada._bias_act_ref(x.double(), bias.double(), "lrelu", 0.2, gain, None)
    assert torch.equal(y.double(), ref.to(dtype).double()) and bool((y == 0).all())
    dx = compiled_ops.bias_act_grad(torch.ones_like(y), y, True, 0.2, gain, -1.0)
    want = torch.tensor([gain, 0.2 * gain, 0.2 * gain], dtype=torch.float64).to(dtype).expand(2, 3)
    assert torch.equal(dx[:, :, 0, 0], want), dx.flatten().tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_act_kernel_gradient_of_a_nan_output_is_zero(compiled_ops, dtype):
    """The gradient's mask is |y| <= the float just below the clamp (+inf without one): one compare, false for a
    NaN y, so a NaN gets dx = 0 with or without a clamp (the reference would give dy * gain * alpha there), while
    an infinite y keeps its gradient where there is no clamp and gets 0 where there is."""
    y = torch.tensor([[float("nan"), -1.0, float("inf"), float("-inf"), 3.0]], dtype=dtype)
    dy = torch.ones_like(y)
    got = compiled_ops.bias_act_grad(dy, y, True, 0.2, 2.0, -1.0)
    assert got[0].tolist() == [0.0, pytest.approx(0.4, rel=1e-3), 2.0, pytest.approx(0.4, rel=1e-3), 2.0]
    got = compiled_ops.bias_act_grad(dy, y, True, 0.2, 2.0, 3.0)                  # 3.0 is on the clamp: 0
    assert got[0].tolist() == [0.0, pytest.approx(0.4, rel=1e-3), 0.0, 0.0, 0.0]


def test_bias_act_kernel_float16_bias_gradient_rounds_once(compiled_ops):
    """Issue 20, item 4 (float16 bias): the sum is float32/float64 whatever the bias's dtype and is rounded to
    float16 once, so a total that float16 holds comes out right even where a running sum would pass 65504; a
    total of 92,682 is inf in float16 because float16 stops at 65504 (the float32 bias holds it exactly)."""
    y = torch.ones(1, 2, 92682, dtype=torch.float16)
    dy = torch.ones_like(y)
    dy[:, 0, 70000:] = -1                                # channel 0: 70000 - 22682 = 47318 (float16: 47328)
    _, db = compiled_ops.bias_act_backward(dy, y, False, 1.0, 1.0, -1.0, torch.float16)
    assert db.dtype == torch.float16 and db[0].item() == torch.tensor(47318.0).half().item()
    assert db[1].item() == float("inf")
    _, db = compiled_ops.bias_act_backward(dy, y, False, 1.0, 1.0, -1.0, torch.float32)
    assert db.tolist() == [47318.0, 92682.0]


def test_upfirdn2d_kernel_twin_refuses_what_the_gpu_refuses(compiled_ops):
    """Issue 20, item 4: the limits are checked in the shared plan, so a launch the GPU cannot make (more than
    65535 tile columns: 4,194,240 outputs wide for the 4x4 kernels) is refused on the CPU too."""
    f = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="too wide"):
        compiled_ops.upfirdn2d(torch.ones(1, 1, 1, 1), f, 1, 1, 0, 4194300, 3, 0, False, 1.0)   # 4,194,298 wide


def test_bias_act_kernel_argument_checks(compiled_ops):
    """Defect 5: alpha is only checked for lrelu; gain must stay positive; dy must match y."""
    x = torch.randn(2, 3, 4)
    assert torch.equal(compiled_ops.bias_act(x, None, False, -1.0, 2.0, -1.0), x * 2)
    assert torch.equal(compiled_ops.bias_act(x, None, True, 0.0, 1.0, -1.0), x.clamp(min=0))
    with pytest.raises(RuntimeError, match="alpha >= 0"):
        compiled_ops.bias_act(x, None, True, -0.1, 1.0, -1.0)
    with pytest.raises(RuntimeError, match="gain must be positive"):
        compiled_ops.bias_act(x, None, False, 0.2, 0.0, -1.0)
    with pytest.raises(RuntimeError, match="shape and dtype"):
        compiled_ops.bias_act_backward(x.double(), x, False, 0.2, 1.0, -1.0, None)


@pytest.mark.parametrize("pad", [(0, 0, 0, 2 ** 31 + 4), (0, 2 ** 31 + 4, 0, 0), (-(2 ** 31) - 4, 0, 0, 0)])
def test_upfirdn2d_kernel_rejects_sizes_past_int32(compiled_ops, pad):
    """Defect 1: a pad past INT32_MAX used to wrap the output size negative and read before x."""
    with pytest.raises(RuntimeError, match="out of range"):
        compiled_ops.upfirdn2d(torch.ones(1, 1, 1, 1), torch.ones(1, 1), 1, 1, *pad, False, 1.0)
    with pytest.raises(RuntimeError, match="smaller than the filter"):
        compiled_ops.upfirdn2d(torch.ones(1, 1, 2, 2), torch.ones(4, 4), 1, 1, 0, 0, 0, 0, False, 1.0)


@pytest.mark.parametrize("arch_list,cap,runs", [
    ("8.0+PTX", (9, 0), True), ("8.0", (9, 0), False), ("8.0", (8, 6), True), ("8.6", (8, 0), False),
    ("8.0;9.0+PTX", (12, 0), True), ("9.0a", (9, 0), True), ("9.0a+PTX", (10, 0), False), ("7.5 8.0", (8, 9), True),
    ("", (9, 0), False),
])
def test_op_loader_arch_list_covers_gpu(arch_list, cap, runs):
    assert nada.ops_build().arch_runs_on(arch_list, cap) is runs


def test_op_loader_refuses_an_arch_list_without_this_gpu(monkeypatch):
    """Defect 3: fall back with a reason before building, instead of "no kernel image" at the first call; and the
    loader leaves TORCH_CUDA_ARCH_LIST and CUDA_HOME as it found them."""
    build = nada.ops_build()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(build, "cuda_home", lambda: "/nonexistent")
    monkeypatch.setattr(build, "build_op", lambda *a: pytest.fail("must not build"))
    build.load_op.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no code for this GPU"):
            ops, reason = build.load_op("bias_act")
        assert ops is None and "sm_90" in reason
    finally:
        build.load_op.cache_clear()


def test_op_build_flags_and_environment(monkeypatch, tmp_path):
    """Defects 3 and 5: the build sees the arch list and toolkit, the process keeps its own environment, and nvcc
    gets no --use_fast_math (it flushes denormals: the GPU would differ from the CPU twin)."""
    from torch.utils import cpp_extension
    build, seen = nada.ops_build(), {}

    def fake_load(name, sources, **kw):
        seen.update(kw, arch=os.environ.get("TORCH_CUDA_ARCH_LIST"), home=os.environ.get("CUDA_HOME"))
        raise RuntimeError("compiler stops here")
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("NADA_OPS_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    before = dict(os.environ)
    with pytest.raises(RuntimeError, match="compiler stops here"):
        build.build_op("bias_act", "/opt/cuda-x")
    assert seen["arch"] == "8.0;9.0+PTX" and seen["home"] == "/opt/cuda-x"
    assert "--use_fast_math" not in seen["extra_cuda_cflags"]
    assert dict(os.environ) == before


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_ops_pass_opcheck(compiled_ops, layout):
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    for op, args in ((compiled_ops.upfirdn2d.default, (x, nada.make_kernel(), 2, 1, 2, 1, 2, 1, False, 4.0)),
                     (compiled_ops.upfirdn2d.default, (x, torch.rand(3, 2), 1, 2, 0, 1, 1, 0, True, 1.0)),
                     (compiled_ops.bias_act.default, (x, torch.randn(3, requires_grad=True), True, 0.2, 1.4, 1.0)),
                     (compiled_ops.bias_act.default, (x, None, False, 0.2, 1.0, -1.0))):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_kernel_ops_compile_fullgraph_forward_and_backward(compiled_ops):
    """torch.compile(fullgraph=True) over both custom ops (here their CPU twins): no graph break, same numbers."""
    f = nada.make_kernel()

    def fn(x, b):
        y = nada._upfirdn2d_cuda(x, f, 2, 1, (2, 1, 2, 1), False, 4.0)
        y = nada._bias_act_cuda(y, b, True, 0.2, nada.SQRT2, 256.0)
        return nada._upfirdn2d_cuda(y, f, 1, 2, (1, 1, 1, 1), False, 1.0)

    torch._dynamo.reset()
    x, b = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(3, requires_grad=True)
    eager = fn(x, b)
    grads = torch.autograd.grad(eager.square().sum(), (x, b))
    compiled = torch.compile(fn, fullgraph=True)(x, b)
    assert torch.equal(compiled, eager)
    for g, h in zip(torch.autograd.grad(compiled.square().sum(), (x, b)), grads):
        assert torch.allclose(g, h, rtol=1e-6, atol=1e-6)


def test_bias_act_kernel_double_backward_is_refused(compiled_ops):
    x = torch.randn(2, 3, 4, requires_grad=True)
    (g,) = torch.autograd.grad(nada._bias_act_cuda(x, None, True, 0.2, 1.4, -1.0).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        g.sum().backward()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_kernels_match_their_cpu_twins_bit_for_bit(dtype):
    """The CPU twin runs the kernel's block code with the same fused multiply-adds: identical results."""
    ops = nada.load_op("upfirdn2d")[0] and nada.load_op("bias_act")[0]
    assert ops is not None
    torch.manual_seed(0)
    for up, down, pad, fh, fw in OP_CASES:
        f = torch.rand(fh, fw)
        for name, x in _layouts(torch.randn(2, 3, 37, 45)).items():
            x = x.to(dtype)
            y = ops.upfirdn2d(x.cuda(), f.cuda(), up, down, *pad, False, 2.0)
            assert torch.equal(y.cpu(), ops.upfirdn2d(x, f, up, down, *pad, False, 2.0)), (up, down, pad, name)
    x, b = torch.randn(4, 64, 16, 16).to(dtype), torch.randn(64)
    y = ops.bias_act(x.cuda(), b.cuda(), True, 0.2, nada.SQRT2, 0.5)
    assert torch.equal(y.cpu(), ops.bias_act(x, b, True, 0.2, nada.SQRT2, 0.5))
    dx, db = ops.bias_act_backward(torch.ones_like(y), y, True, 0.2, nada.SQRT2, 0.5, torch.float32)
    dxc, dbc = ops.bias_act_backward(torch.ones_like(y.cpu()), y.cpu(), True, 0.2, nada.SQRT2, 0.5, torch.float32)
    assert torch.equal(dx.cpu(), dxc) and torch.equal(db.cpu(), dbc)
    with pytest.raises(RuntimeError, match="y's device"):
        ops.bias_act_backward(torch.ones_like(y.cpu()), y, True, 0.2, 1.0, -1.0, None)
    tiny = torch.full((1, 2, 8, 8), 1e-40)                 # denormals survive: no --use_fast_math
    assert torch.equal(ops.bias_act(tiny.cuda(), None, False, 0.2, 1.0, -1.0).cpu(), tiny)


# ---- generator ----------------------------------------------------------------------------------------------

def test_random_noise_changes_images_and_none_differs_from_const():
    torch.manual_seed(0)
    G = nada.Generator(16, style_dim=32, n_mlp=1, channels={4: 16, 8: 16, 16: 16})
    for m in G.modules():
        if isinstance(m, nada.NoiseInjection):
            m.weight.data.fill_(0.5)
    ws = G.mapping(torch.randn(2, 32))
    with torch.no_grad():
        a, b = G.synthesis(ws, "random"), G.synthesis(ws, "random")
        assert not torch.equal(a, b)
        assert torch.equal(G.synthesis(ws, "const"), G.synthesis(ws, "const"))
        assert not torch.equal(G.synthesis(ws, "none"), G.synthesis(ws, "const"))


# ---- CLIP loss ----------------------------------------------------------------------------------------------

def test_directional_loss_against_hand_computation():
    e_frozen = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), dim=1)
    e_adapted = F.normalize(torch.tensor([[1.0, 1.0, 0, 0], [0, 1.0, 0, 1.0]]), dim=1)
    direction = F.normalize(torch.tensor([0.0, 1.0, 0, 0]), dim=0)
    loss = nada.directional_loss(e_frozen, e_adapted, direction, eps=0)
    s = 1 / np.sqrt(2)
    d1 = np.array([s - 1, s, 0, 0]); d2 = np.array([0, s - 1, 0, s])
    cos1 = d1[1] / np.linalg.norm(d1); cos2 = d2[1] / np.linalg.norm(d2)
    assert abs(loss.item() - ((1 - cos1) + (1 - cos2)) / 2) < 1e-6
    # with the soft norm, |d| >> eps changes the value by < eps^2 / |d|^2
    assert abs(nada.directional_loss(e_frozen, e_adapted, direction).item() - loss.item()) < 1e-3


def test_the_text_direction_is_the_template_mean_of_normalised_differences(colour_clip):
    model = nada.load_clip(colour_clip)
    templates = ("a {}.", "a photo of a {}.", "{} art")
    d = nada.text_targets(model, "photo", "red photo", templates)[0]
    clip = nada._import_clip()
    with torch.no_grad():
        enc = lambda t: F.normalize(model.encode_text(clip.tokenize([tp.format(t) for tp in templates])).float(), dim=-1)
        expected = F.normalize((enc("red photo") - enc("photo")).mean(0), dim=0)
    assert torch.allclose(d, expected, atol=1e-6)
    assert d[0] > 0.9                                     # the colour CLIP: "red" lives on axis 0


def test_clip_preprocess_resizes_the_short_side_and_crops_the_centre():
    class V:
        input_resolution = 24
    model = types.SimpleNamespace(visual=V())
    x = nada.clip_preprocess(torch.zeros(2, 3, 64, 96), model)
    assert x.shape == (2, 3, 24, 24)
    assert torch.allclose(x[0, :, 0, 0], (0.5 - torch.tensor(nada.CLIP_MEAN)) / torch.tensor(nada.CLIP_STD))
    mean, std = torch.tensor(nada.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(nada.CLIP_STD).view(1, 3, 1, 1)

    def picture(h, w):                                    # every column and every row differs, per channel and image
        ramp = torch.linspace(-0.6, 0.6, w).view(1, 1, 1, w) + \
            torch.linspace(-0.3, 0.3, h).view(1, 1, h, 1) * torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1)
        return torch.cat([ramp, -ramp])

    def expected(img, size, top, left):                   # bicubic resize of the short side to 24, crop, normalise
        x = (img + 1) / 2
        if size != tuple(img.shape[2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        return (x[:, :, top:top + 24, left:left + 24] - mean) / std

    wide, tall = picture(64, 96), picture(96, 64)
    assert torch.allclose(nada.clip_preprocess(wide, model), expected(wide, (24, 36), 0, 6), atol=1e-6)
    assert not torch.allclose(expected(wide, (24, 36), 0, 0), expected(wide, (24, 36), 0, 6), atol=1e-2)
    assert torch.allclose(nada.clip_preprocess(tall, model), expected(tall, (36, 24), 6, 0), atol=1e-6)
    for n in (48, 24):                                    # square: resized whole, without a crop (24: untouched)
        square = picture(n, n)
        assert torch.allclose(nada.clip_preprocess(square, model), expected(square, (24, 24), 0, 0), atol=1e-6)


# ---- freezing -----------------------------------------------------------------------------------------------

def test_layers_driven_by_matches_what_synthesis_reads():
    G = tiny_generator()
    ws = G.mapping(torch.randn(2, 32)).detach()
    read = {}
    hooks = []
    for name, m in G.named_modules():
        if name.endswith("conv.modulation"):
            layer = name[:-len(".conv.modulation")]
            hooks.append(m.register_forward_hook(lambda mod, inp, out, layer=layer: read.__setitem__(layer, inp[0])))
    with torch.no_grad():
        G.synthesis(ws)
    for h in hooks:
        h.remove()
    readers = {j: sorted(l for l, t in read.items() if torch.equal(t, ws[:, j]) and t.data_ptr() == ws[:, j].data_ptr())
               for j in range(G.num_ws)}
    for j in range(G.num_ws):
        assert readers[j] == sorted(nada.layers_driven_by(G, j)), j
    assert nada.layers_driven_by(G, 1) == ["convs.0", "to_rgb1"] and nada.layers_driven_by(G, 7) == ["to_rgbs.2"]


def test_parse_layers():
    G = tiny_generator()
    assert nada.parse_layers("last:1", G) == ["convs.4", "convs.5", "to_rgbs.2"]
    assert nada.parse_layers("first:1", G) == ["input", "conv1", "to_rgb1"]
    assert nada.parse_layers("16,32", G) == ["convs.2", "convs.3", "to_rgbs.1", "convs.4", "convs.5", "to_rgbs.2"]
    assert len(nada.parse_layers("all", G)) == 12
    assert nada.parse_layers("auto", G, auto_k=3) == 3                # chosen anew at every step
    # every W+ entry chosen: the fixed list of layers that read ws (the constant input reads none)
    assert nada.parse_layers("auto", G) == nada.parse_layers("all", G)[1:]


@pytest.mark.parametrize("bad,k", [("last:9", None), ("64", None), ("some", None), ("16,", None), ("auto", 0),
                                   ("auto", 9)])
def test_parse_layers_refuses(bad, k):
    with pytest.raises(nada.NadaError, match="--auto-k" if k is not None else "--layers"):
        nada.parse_layers(bad, tiny_generator(), auto_k=k)


def test_gradients_only_on_selected_layers():
    G = tiny_generator()
    n = nada.set_trainable(G, ["convs.4", "to_rgbs.2"])
    G.synthesis(G.mapping(torch.randn(2, 32))).square().mean().backward()
    with_grad = {k for k, p in G.named_parameters() if p.grad is not None}
    assert with_grad and all(k.startswith(("convs.4.", "to_rgbs.2.")) for k in with_grad)
    assert n == sum(p.numel() for k, p in G.named_parameters() if k.startswith(("convs.4.", "to_rgbs.2.")))


# ---- train ----------------------------------------------------------------------------------------------------

def test_step_zero_is_finite_and_small(colour_clip):
    G0 = tiny_generator().requires_grad_(False)
    G = tiny_generator()
    model = nada.load_clip(colour_clip)
    targets = [nada.ClipTarget(model, 1.0, nada.text_targets(model, "photo", "red photo")[0], None)]
    before = {k: v.clone() for k, v in G.state_dict().items()}
    opt = torch.optim.Adam([p for k, p in G.named_parameters() if not k.startswith("style.")], lr=nada.LR, betas=nada.BETAS)
    layers, loss, _ = nada.train_step(G0, G, opt, targets, layers=nada.parse_layers("all", G), batch=2, mixing=0.0,
                                      cls=None, rng=torch.Generator().manual_seed(0), device="cpu")
    assert loss == 1.0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())   # CLIP never trains
    assert all(p.grad is None for p in G0.parameters())
    grads = [p.grad for p in G.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    change = max((G.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert 0 < change <= nada.LR * 1.01                   # Adam's first step: at most lr per element


@pytest.mark.parametrize("word,channel", [("red", 0), ("blue", 2)])
def test_training_moves_images_toward_the_prompt(tmp_path, colour_clip, tiny_ckpt, word, channel):
    out = nada.train(src="photo", tgt=f"{word} photo", ckpt=tiny_ckpt, out=str(tmp_path / word), iters=40,
                     layers="all", clip=colour_clip, progress=False, sample_every=1000)
    G0, G1 = nada.load_generator(tiny_ckpt), nada.load_generator(os.path.join(out, "generator.pt"))
    z = torch.randn(16, 32, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        before, after = G0(z), G1(z)
    assert redness(after, channel) > redness(before, channel) + 0.1
    model = nada.load_clip(colour_clip)
    direction = nada.text_targets(model, "photo", f"{word} photo")[0]
    with torch.no_grad():
        loss = nada.directional_loss(nada.encode_images(model, before), nada.encode_images(model, after), direction)
    assert loss < 0.5


def test_frozen_tensors_bitwise_unchanged(tmp_path, colour_clip, tiny_ckpt):
    out = nada.train(src="photo", tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / "r"), iters=6, layers="last:1",
                     clip=colour_clip, progress=False)
    a = torch.load(tiny_ckpt, weights_only=True)["g_ema"]
    b = torch.load(os.path.join(out, "generator.pt"), weights_only=True)["g_ema"]
    trained = ("convs.4.", "convs.5.", "to_rgbs.2.")
    for k in a:
        if k.startswith(trained) and not k.endswith("kernel"):
            continue
        assert torch.equal(a[k], b[k]), k                 # mapping, other blocks, buffers
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith(trained))


def test_auto_layers_select_k_entries_each_step(tmp_path, colour_clip, tiny_ckpt):
    out = nada.train(src="photo", tgt="blue photo", ckpt=tiny_ckpt, out=str(tmp_path / "a"), iters=3, layers="auto",
                     auto_k=2, clip=colour_clip, progress=False)
    G = nada.load_generator(tiny_ckpt)
    for row in map(json.loads, open(os.path.join(out, "log.jsonl"))):
        possible = [set(nada.layers_driven_by(G, j)) for j in range(G.num_ws)]
        covered = set(row["layers"])
        # exactly the union of the layers of 2 W+ entries
        assert any(covered == possible[i] | possible[j] for i in range(G.num_ws) for j in range(i + 1, G.num_ws))


def test_image_targets(tmp_path, colour_clip, tiny_ckpt):
    from PIL import Image
    paths = []
    for i, rgb in enumerate([(250, 10, 10), (200, 30, 40)]):
        paths.append(str(tmp_path / f"t{i}.png"))
        Image.new("RGB", (40, 48), rgb).save(paths[-1])
    out = nada.train(src="", tgt="", tgt_img=paths, ckpt=tiny_ckpt, out=str(tmp_path / "img"), iters=30, layers="auto",
                     auto_k=4, clip=colour_clip, progress=False)
    G0, G1 = nada.load_generator(tiny_ckpt), nada.load_generator(os.path.join(out, "generator.pt"))
    z = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert redness(G1(z), 0) > redness(G0(z), 0) + 0.1


def test_train_conditional_generator_with_class(tmp_path, colour_clip):
    ckpt = os.path.join(FIXTURES, "nvidia_32_cond.pkl")
    out = nada.train(tgt="blue photo", ckpt=ckpt, cls="all", iters=2, layers="last:2", out=str(tmp_path / "c"),
                     clip=colour_clip, progress=False)
    G = nada.load_generator(os.path.join(out, "generator.pt"))
    assert G.c_dim == 10 and G.conv_clamp == 256
    G0 = nada.load_generator(ckpt)
    saved = torch.load(os.path.join(out, "generator.pt"), weights_only=True)
    a, b = G0.state_dict(), saved["g_ema"]
    assert set(a) == set(b)
    # last:2 of 32 px is the 16 and 32 px blocks: each of their parameters moved, every other tensor (mapping,
    # class embedding, earlier blocks, noise and filter buffers) is bitwise the base's
    trained = ("convs.2.", "convs.3.", "convs.4.", "convs.5.", "to_rgbs.1.", "to_rgbs.2.")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {k for k, _ in G0.named_parameters() if k.startswith(trained)}
    assert any(k.startswith("embed.") for k in a) and torch.equal(saved["latent_avg"], G0.latent_avg)
    assert saved["nada"]["cls"] == "all" and json.load(open(os.path.join(out, "config.json")))["cls"] == "all"


# ---- memory: the lean step and the dry run ------------------------------------------------------------------

def _step_pair(colour_clip, layers_spec, **step_kw):
    """Two identical (frozen, trainable, optimiser) setups and CLIP targets for comparing steps."""
    model = nada.load_clip(colour_clip)
    targets = [nada.ClipTarget(model, 1.0, nada.text_targets(model, "photo", "red photo")[0],
                               F.normalize(nada.encode_prompts(model, ["red photo"])[0].mean(0), dim=0))]
    setups = []
    for _ in range(2):
        G0, G = tiny_generator().requires_grad_(False), tiny_generator()
        opt = torch.optim.Adam([p for k, p in G.named_parameters() if not k.startswith("style.")], lr=0.01,
                               betas=nada.BETAS)
        setups.append((G0, G, opt))
    layers = nada.parse_layers(layers_spec, setups[0][1], step_kw.pop("auto_k", None))
    run = lambda G0, G, opt: nada.train_step(G0, G, opt, targets, layers=layers, batch=2, mixing=0.5, cls=None,
                                             rng=torch.Generator().manual_seed(3), device="cpu", **step_kw)
    return setups, run


@pytest.mark.parametrize("layers", ["all", "last:2", "16,32"])
def test_lean_step_equals_the_plain_step(colour_clip, monkeypatch, layers):
    """--memory low (every synthesis layer recomputed in backward) and the shared frozen prefix of late layers
    give the plain step's loss and gradients: three steps, then the weights agree."""
    (plain, lean), run = _step_pair(colour_clip, layers)
    lean[1].checkpointing = True
    results = {}
    for name, setup in (("lean", lean), ("plain", plain)):
        with monkeypatch.context() as m:
            if name == "plain":                          # no shared prefix: every block rendered by both
                m.setattr(nada, "first_trained_block", lambda G, layers: 0)
            results[name] = [run(*setup) for _ in range(3)]
    assert [r[1] for r in results["lean"]] == pytest.approx([r[1] for r in results["plain"]], abs=1e-6)
    for k, v in plain[1].state_dict().items():
        assert torch.allclose(v, lean[1].state_dict()[k], atol=1e-6), k
    assert any(not torch.equal(v, plain[0].state_dict()[k]) for k, v in plain[1].state_dict().items())


def test_bf16_precision_trains_with_float32_weights(colour_clip):
    (setup, _), run = _step_pair(colour_clip, "all", precision="bf16")
    layers, loss, _ = run(*setup)
    assert 0 < loss <= 1.0 + 1e-6                        # step 0: the generators agree
    assert all(p.dtype == torch.float32 for p in setup[1].parameters())
    assert any(s["exp_avg"].abs().sum() > 0 for s in setup[2].state.values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in setup[2].state.values())


def test_shared_prefix_renders_what_the_whole_network_renders():
    G = tiny_generator(size=64)
    ws = G.mapping(torch.randn(2, 32)).detach()
    with torch.no_grad():
        full = G.synthesis(ws)
        for n in range(1, len(nada.synthesis_blocks(G))):
            assert torch.equal(G.synthesis(ws, start=G.synthesis(ws, stop=n)), full), n
    assert nada.first_trained_block(G, nada.parse_layers("last:2", G)) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_selection_picks_what_unchunked_selection_picks(colour_clip, seed):
    model = nada.load_clip(colour_clip)
    targets = [nada.ClipTarget(model, 1.0, None, F.normalize(nada.encode_prompts(model, ["blue photo"])[0].mean(0), dim=0))]
    G = tiny_generator()
    ws = G.mapping(torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))).detach()
    for k in (1, 3, 5):
        whole = nada.select_layers_auto(G, ws, targets, k)
        assert nada.select_layers_auto(G, ws, targets, k, chunk=2) == whole
        assert nada.select_layers_auto(G, ws, targets, k, chunk=3) == whole   # a last chunk of 2
    assert all(p.grad is None for p in G.parameters())


def test_memory_auto_takes_low_only_when_fast_does_not_fit(colour_clip, tiny_ckpt, monkeypatch):
    kw = dict(tgt="red photo", ckpt=tiny_ckpt, clip=colour_clip, layers="all", device="cuda", dry_run=True,
              memory="auto")
    fast = nada.train(**{**kw, "memory": "fast"})["peak_bytes"] + nada.CUDA_CONTEXT
    monkeypatch.setattr(nada, "free_gpu_bytes", lambda device: fast - 1)
    e = nada.train(**kw)
    assert e["memory"] == "low" and f"fast needs {fast / 2 ** 30:.1f} GiB" in e["why"]
    assert e["peak_bytes"] < fast - nada.CUDA_CONTEXT
    monkeypatch.setattr(nada, "free_gpu_bytes", lambda device: fast)
    assert nada.train(**kw)["memory"] == "fast"
    assert nada.train(**{**kw, "device": "cpu"})["memory"] == "fast"


def test_dry_run_of_a_named_model_reads_downloads_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NADA_MIRROR", "http://127.0.0.1:9")           # any download would fail loudly
    rc, out, err = main_in_process(capsys, "train", "--ckpt", "ffhq256", "--clip", "ViT-B/32", "--device", "cuda",
                                   "--layers", "all", "--memory", "low", "--dry-run", "--weights-dir", tmp_path / "w")
    assert rc == 0, err
    assert "device cuda | memory low (as asked)" in out
    for part in ("weights", "optimizer", "activations", "peak", "CUDA context"):
        assert part in out
    assert os.listdir(tmp_path) == []


class _Recount(torch.utils._python_dispatch.TorchDispatchMode):
    """An independent count of live storage: after every op, every tensor seen so far that is still alive,
    summed by storage from scratch (weak references, not LiveBytes' reference counts)."""

    def __init__(self, tensors):
        super().__init__()
        self.seen, self.peak = {}, 0                      # id -> weak reference (tensors compare elementwise)
        self.add(tensors)

    def add(self, tensors):
        import weakref
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.seen[id(t)] = weakref.ref(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(torch.utils._pytree.tree_leaves((args, kwargs, out)))
        alive = [t for t in (r() for r in self.seen.values()) if t is not None]
        live = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in alive}
        self.peak = max(self.peak, sum(live.values()))
        return out


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_dry_run_agrees_with_an_independent_count(colour_clip, tiny_ckpt, monkeypatch, memory):
    real, recounts = nada.estimate_memory, []

    def recounted(step, modules, opt, steps=2):          # the same steps, watched by a second counter
        with _Recount(t for m in modules for t in list(m.parameters()) + list(m.buffers())) as recount:
            result = real(step, modules, opt, steps)
        recounts.append(recount.peak)
        return result
    monkeypatch.setattr(nada, "estimate_memory", recounted)
    e = nada.train(tgt="red photo", ckpt=tiny_ckpt, clip=colour_clip, layers="auto", auto_k=3, device="cuda",
                   dry_run=True, memory=memory)
    assert abs(e["peak_bytes"] - recounts[0]) <= 0.15 * recounts[0], (e["peak_bytes"], recounts)
    assert e["weights_bytes"] + e["optimizer_bytes"] + e["activation_bytes"] == e["peak_bytes"]
    assert e["optimizer_bytes"] > 0 and e["activation_bytes"] > 0


# ---- sample ---------------------------------------------------------------------------------------------------

def test_sample_cli_conditional_writes_pngs_deterministically(tmp_path):
    ckpt = os.path.join(FIXTURES, "nvidia_32_cond.pkl")
    outs = []
    for run in ("a", "b"):
        rc, out, err = run_cli("sample", "--ckpt", ckpt, "--class", "bird", "--n", 8, "--out", tmp_path / run)
        assert rc == 0, err
        assert str(tmp_path / run) in out
        outs.append({f: (tmp_path / run / f).read_bytes() for f in sorted(os.listdir(tmp_path / run))})
    assert sorted(outs[0]) == ["grid.png"] + [f"seed{i:04d}.png" for i in range(8)]
    assert outs[0] == outs[1]
    from PIL import Image
    assert Image.open(tmp_path / "a" / "seed0003.png").size == (32, 32)
    # the PNG holds the generator's image for that seed: seed 3, class bird (2)
    G = nada.load_generator(ckpt)
    with torch.no_grad():
        img = G(nada.seed_latents(G, [3]), F.one_hot(torch.tensor([2]), 10).float())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "seed0003.png")), nada.to_uint8(img)[0])


# ---- measure: eval, study, torchrun ---------------------------------------------------------------------------

def test_consistency_loss_against_hand_computation():
    a = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0]]), dim=-1)
    b = F.normalize(torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1]]), dim=-1)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    expected = sum((float(b[i] @ b[j]) - float(a[i] @ a[j])) ** 2 for i, j in pairs) / len(pairs)
    assert nada.consistency_loss(a, b).item() == pytest.approx(expected, rel=1e-6)
    assert expected > 0.1
    assert nada.consistency_loss(a, a).item() == 0                 # same angles: nothing to pay
    rotation = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])   # a rotation keeps every angle
    assert nada.consistency_loss(a, a @ rotation.T).item() == pytest.approx(0, abs=1e-7)
    assert nada.consistency_loss(a[:1], b[:1]).item() == 0


def test_clip_metrics_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    base, adapted = (F.normalize(torch.randn(5, 4, generator=g), dim=-1) for _ in range(2))
    target, direction = (F.normalize(torch.randn(4, generator=g), dim=0) for _ in range(2))
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))
    pairs = [(i, j) for i in range(5) for j in range(i)]
    div = lambda e: sum(1 - cos(e[i], e[j]) for i, j in pairs) / len(pairs)
    m = nada.clip_metrics(base, adapted, target, direction)
    expected = dict(clip_score=sum(cos(e, target) for e in adapted) / 5,
                    directional=sum(cos(a - b, direction) for a, b in zip(adapted, base)) / 5,
                    diversity=div(adapted), base_diversity=div(base), diversity_ratio=div(adapted) / div(base),
                    pair_similarity=sum(cos(a, b) for a, b in zip(adapted, base)) / 5)
    assert m == pytest.approx(expected, rel=1e-5, abs=1e-6)
    same = nada.clip_metrics(base, base, target, direction)
    assert same["directional"] == 0 and same["diversity_ratio"] == 1 and same["pair_similarity"] == pytest.approx(1)
    collapsed = nada.clip_metrics(base[:1].expand(5, 4), adapted, target, direction)
    assert collapsed["base_diversity"] < 1e-6 and math.isnan(collapsed["diversity_ratio"])   # no base spread: no ratio


def test_eval_of_the_base_against_itself_is_no_change(tmp_path, colour_clip, tiny_ckpt):
    rc, out, err = run_cli("eval", "--ckpt", tiny_ckpt, "--base", tiny_ckpt, "--src", "photo", "--tgt", "red photo",
                           "--clip", colour_clip, "--n", 12, "--out", tmp_path / "e.json")
    assert rc == 0, err
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["directional"] == 0 and record["diversity_ratio"] == 1 and record["pair_similarity"] == pytest.approx(1)
    assert record["n"] == 12 and record["seeds"] == "0-11" and record["trunc"] == 1.0
    assert record["clip"] == [colour_clip] and set(record["per_clip"]) == {colour_clip}
    assert "no change" in out and "diversity_ratio" in out


def test_eval_renders_the_latents_sample_renders(tmp_path, colour_clip, monkeypatch):
    ckpt = os.path.join(FIXTURES, "nvidia_32_cond.pkl")
    rc, _, err = run_cli("sample", "--ckpt", ckpt, "--class", "all", "--seeds", "3-7", "--out", tmp_path / "s")
    assert rc == 0, err
    seen = []
    real = nada.encode_images
    monkeypatch.setattr(nada, "encode_images", lambda m, img: (seen.append(img), real(m, img))[1])
    nada.evaluate(ckpt, base=ckpt, src="photo", tgt="red photo", clip=colour_clip, seeds="3-7", cls="all", batch=2,
                  out=str(tmp_path / "e.json"), progress=False)
    from PIL import Image
    rendered = nada.to_uint8(torch.cat(seen[0::2]))        # per batch: the base's images, then the adapted ones
    assert len(seen) == 6 and len(rendered) == 5
    for k, s in enumerate(range(3, 8)):                    # eval renders 2 at a time, sample 1: the convolutions
        png = np.asarray(Image.open(tmp_path / "s" / f"seed{s:04d}.png")).astype(int)   # may round a value
        diff = np.abs(rendered[k].astype(int) - png)          # across a uint8 step (seen: 1 pixel of 1024)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (s, diff.max(), (diff > 0).sum())


@pytest.fixture(scope="module")
def red_and_blue_runs(tmp_path_factory, colour_clip, tiny_ckpt):
    root = tmp_path_factory.mktemp("runs")
    return {word: nada.train(src="photo", tgt=f"{word} photo", ckpt=tiny_ckpt, out=str(root / word), iters=30,
                             lr=0.02, layers="all", clip=colour_clip, progress=False, sample_every=1000)
            for word in ("red", "blue")}


def test_eval_scores_a_red_run_above_a_blue_run_for_red(tmp_path, colour_clip, red_and_blue_runs):
    scores = {w: nada.evaluate(run, clip=colour_clip, tgt="red photo", n=32, out=str(tmp_path / f"{w}.json"),
                               progress=False) for w, run in red_and_blue_runs.items()}
    print({w: (s["clip_score"], s["directional"]) for w, s in scores.items()})
    assert scores["red"]["clip_score"] > scores["blue"]["clip_score"] + 0.05     # measured: 0.533 and 0.362
    assert scores["red"]["directional"] > 0.5 and scores["red"]["directional"] > scores["blue"]["directional"] + 0.3
    recorded = nada.evaluate(red_and_blue_runs["blue"], clip=colour_clip, n=32, out=str(tmp_path / "b.json"),
                             progress=False)                  # defaults: the run's own prompts and base
    assert recorded["tgt"] == "blue photo" and recorded["directional"] > 0.5
    assert os.path.isfile(tmp_path / "b.json")


def test_sample_walk_animates_the_base_beside_each_run(tmp_path, red_and_blue_runs, capsys):
    """--walk 3 --frames 4: 12 frames looping through seeds 0-2, base | red | blue side by side; the first frame is
    seed 0's image from each generator, and the red column is the reddest."""
    from PIL import Image
    red, blue = red_and_blue_runs["red"], red_and_blue_runs["blue"]   # run folders stand for their generator.pt
    for fmt in ("webp", "gif"):
        rc, out, err = main_in_process(capsys, "sample", "--ckpt", red, "--also", blue, "--walk", 3, "--frames", 4,
                                       "--fps", 10, "--format", fmt, "--out", tmp_path / fmt)
        assert rc == 0 and f"12 frames at 10 fps, 3 generator(s)" in out, err
        assert os.listdir(tmp_path / fmt) == [f"walk.{fmt}"]
        anim = Image.open(tmp_path / fmt / f"walk.{fmt}")
        anim.load()                                       # a frame says its duration once read
        assert (anim.format, anim.size, anim.n_frames, anim.info["duration"]) == (fmt.upper(), (96, 32), 12, 100)
    assert main_in_process(capsys, "sample", "--ckpt", red, "--also", blue, "--compare", "--seeds", "0-1", "--out",
                           tmp_path / "png")[0] == 0
    stills = [np.asarray(Image.open(tmp_path / "png" / f"seed000{i}.png")).astype(float) for i in (0, 1)]
    anim = Image.open(tmp_path / "webp" / "walk.webp")
    frames = []
    for i in (0, 4):                                      # frame 4 is seed 1's: the walk has reached it
        anim.seek(i)
        frames.append(np.asarray(anim.convert("RGB")).astype(float))
    dist = [[np.abs(f - still).mean() for still in stills] for f in frames]
    assert dist[0][0] < 10 and dist[1][1] < 10 and dist[0][1] > 2 * dist[0][0] and dist[1][0] > 2 * dist[1][1], dist
    still = stills[0]
    reds = [(still[:, i:i + 32, 0] - still[:, i:i + 32, 1:].mean(-1)).mean() for i in (0, 32, 64)]
    assert reds[1] > reds[0] + 5 and reds[1] > reds[2] + 5


@pytest.mark.parametrize("flags,words", [
    (["--frames", 3], "--frames, --fps and --format shape the animation of --walk N"),
    (["--walk", 1], "--walk 1"),
    (["--walk", 2, "--seeds", 5], "a walk needs 2 seeds or more"),
    (["--walk", 100, "--frames", 100], "at most 2000 frames"),
    (["--walk", 2, "--fps", 0], "--fps 0"),
])
def test_sample_walk_refusals(tmp_path, tiny_ckpt, flags, words):
    rc, _, err = run_cli("sample", "--ckpt", tiny_ckpt, *flags, "--out", tmp_path / "w")
    assert_clean_error(rc, err, words)
    assert not (tmp_path / "w").exists()


def test_sample_walk_without_its_base_and_walks_too_large(tmp_path, capsys, colour_clip, tiny_ckpt, monkeypatch):
    """A run whose base file is gone walks alone (and says so); --compare says the base is gone; a walk that would
    hold more than MAX_WALK_BYTES is refused before it renders."""
    shutil.copy(tiny_ckpt, tmp_path / "base.pt")
    run = nada.train(tgt="red photo", ckpt=str(tmp_path / "base.pt"), out=str(tmp_path / "r"), iters=1,
                     clip=colour_clip, progress=False)
    os.remove(tmp_path / "base.pt")
    rc, out, err = main_in_process(capsys, "sample", "--ckpt", run, "--walk", 2, "--frames", 2, "--out", tmp_path / "w")
    assert rc == 0 and "is not there any more: the walk shows the run alone" in out, err
    from PIL import Image
    assert Image.open(tmp_path / "w" / "walk.webp").size == (32, 32)
    rc, _, err = main_in_process(capsys, "sample", "--ckpt", run, "--compare", "--out", tmp_path / "c")
    assert_clean_error(rc, err, f"--compare: the base {run}/generator.pt records, {tmp_path / 'base.pt'}, is not "
                       "there any more")
    monkeypatch.setattr(nada, "MAX_WALK_BYTES", 32 * 32 * 3 * 4 - 1)
    rc, _, err = main_in_process(capsys, "sample", "--ckpt", run, "--walk", 2, "--frames", 2, "--out", tmp_path / "b")
    assert_clean_error(rc, err, "--walk: 4 frames of 32x32 px", "fewer seeds, --frames or --also runs")
    assert not (tmp_path / "b" / "walk.webp").exists()


def test_sample_also_refuses_another_architecture(tmp_path, tiny_ckpt, red_and_blue_runs):
    rc, _, err = run_cli("sample", "--ckpt", os.path.join(red_and_blue_runs["red"], "generator.pt"), "--also",
                         os.path.join(FIXTURES, "nvidia_32_cond.pkl"), "--out", tmp_path / "s")
    assert_clean_error(rc, err, "--also", "another architecture")


def test_eval_refusals_are_one_clear_error(tmp_path, colour_clip, tiny_ckpt, red_and_blue_runs):
    rc, _, err = run_cli("eval", "--ckpt", tiny_ckpt, "--clip", colour_clip)
    assert_clean_error(rc, err, "records no prompts", "--src and --tgt")
    rc, _, err = run_cli("eval", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--src", "photo", "--tgt", "red photo")
    assert_clean_error(rc, err, "records no base", "--base")
    rc, _, err = run_cli("eval", "--ckpt", tmp_path, "--clip", colour_clip)
    assert_clean_error(rc, err, "no generator.pt")
    rc, _, err = run_cli("eval", "--ckpt", red_and_blue_runs["red"], "--clip", colour_clip, "--n", 1)
    assert_clean_error(rc, err, "--samples 1", "at least 2")
    rc, _, err = run_cli("eval", "--ckpt", red_and_blue_runs["red"], "--clip", colour_clip, "--trunc", "nan")
    assert_clean_error(rc, err, "--trunc")
    rc, _, err = run_cli("train", "--ckpt", tiny_ckpt, "--clip", colour_clip, env={"WORLD_SIZE": "2", "RANK": "0"})
    assert_clean_error(rc, err, "torchrun", "study")


def test_consistency_keeps_diversity_where_plain_nada_collapses(tmp_path, tiny_ckpt):
    # A high lr toward "red" makes every image about as red as the others: their colour-reading embeddings crowd
    # together (collapse). The test CLIP's constant axis is larger here (0.03), so that images of one colour still
    # differ in brightness. Over 13 seeds of this setting the ratio rose by 0.28 or more with the consistency loss,
    # and its directional score kept 87% or more of plain NADA's (seed 0: ratio 0.29 -> 0.65, directional 0.64 -> 0.59).
    clip_file = make_colour_clip(tmp_path / "clip.pt", const=0.03)
    model, scores = nada.load_clip(clip_file), {}
    for w in (0, 2):
        run = nada.train(src="photo", tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / f"w{w}"), iters=60, batch=8,
                         lr=0.1, layers="all", clip=clip_file, consistency=w, progress=False, sample_every=1000)
        scores[w] = nada.evaluate(run, clip=clip_file, clip_models=[model], n=64, out=str(tmp_path / f"{w}.json"),
                                  progress=False)
    print({w: (s["diversity_ratio"], s["directional"]) for w, s in scores.items()})
    assert scores[0]["diversity_ratio"] < 0.45                                  # plain NADA collapsed ...
    assert scores[2]["diversity_ratio"] > scores[0]["diversity_ratio"] + 0.2    # ... the consistency loss did not
    assert scores[0]["directional"] > 0.5 and scores[2]["directional"] > 0.8 * scores[0]["directional"]
    assert json.loads((tmp_path / "w2" / "config.json").read_text())["consistency"] == 2


def _study(tmp_path, colour_clip, tiny_ckpt, **kw):
    args = dict(ckpt=tiny_ckpt, src="photo", tgt="red photo", layers="first:1,all", consistency="0,4", iters=4,
                batch=3, clip=colour_clip, eval_clip=colour_clip, n=16, grid=3, out=str(tmp_path / "study"), progress=False)
    return nada.study(**{**args, **kw})


def test_study_writes_every_output_and_skips_finished_settings(tmp_path, colour_clip, tiny_ckpt, monkeypatch):
    rows = _study(tmp_path, colour_clip, tiny_ckpt)
    out = tmp_path / "study"
    folders = ["first_1_consistency_0", "first_1_consistency_4", "all_consistency_0", "all_consistency_4"]
    assert [r["folder"] for r in rows] == folders
    assert [r["setting"] for r in rows] == ["first:1, consistency 0", "first:1, consistency 4", "all, consistency 0",
                                            "all, consistency 4"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(rows)) and saved["n"] == 16
    for r, f in zip(rows, folders):
        assert nada.run_step(out / f) == 4 and r["final_loss"] == nada.read_log(out / f)[-1]["loss"]
        assert json.loads((out / f / "eval.json").read_text())["clip_score"] == r["clip_score"]
        assert set(nada.METRICS) <= set(r)
    from PIL import Image
    grid = Image.open(out / "grid.png")
    assert grid.size[1] == 64 * 5 and grid.size[0] > 64 * 3     # base + 4 rows of 64 px tiles, labels on the left
    assert Image.open(out / "loss.png").size == (720, 420)
    md = (out / "results.md").read_text()
    assert all(r["setting"] in md for r in rows) and "clip_score" in md
    # first:1 trains only the 4 px block: its other layers are unchanged, all's are not
    base, G = nada.load_generator(tiny_ckpt), nada.load_generator(str(out / folders[0] / "generator.pt"))
    assert torch.equal(base.to_rgbs[-1].conv.weight, G.to_rgbs[-1].conv.weight)
    assert not torch.equal(base.conv1.conv.weight, G.conv1.conv.weight)
    # a rerun trains and measures nothing again, and writes the same results
    monkeypatch.setattr(nada, "train", lambda **kw: pytest.fail("a finished setting was trained again"))
    monkeypatch.setattr(nada, "measure", lambda *a, **kw: pytest.fail("a finished setting was measured again"))
    assert _study(tmp_path, colour_clip, tiny_ckpt) == rows


def test_study_resumes_an_interrupted_setting_as_if_uninterrupted(tmp_path, colour_clip, tiny_ckpt):
    kw = dict(layers="all", consistency="2", iters=6)
    _study(tmp_path / "a", colour_clip, tiny_ckpt, **kw)
    _study(tmp_path / "b", colour_clip, tiny_ckpt, **{**kw, "iters": 3})       # stopped at step 3 ...
    rows = _study(tmp_path / "b", colour_clip, tiny_ckpt, **kw)                 # ... and rerun: resumes
    a, b = (tmp_path / d / "study" / "all" / "generator.pt" for d in "ab")
    sa, sb = (torch.load(p, weights_only=True)["g_ema"] for p in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log = nada.read_log(tmp_path / "b" / "study" / "all")
    assert [e["iter"] for e in log] == list(range(6))
    assert all(x["seconds"] <= y["seconds"] for x, y in zip(log, log[1:]))   # seconds count the whole run
    assert rows[0]["seconds"] == log[-1]["seconds"] and rows[0]["setting"] == "all"


def test_study_refuses_bad_settings_before_training(tmp_path, colour_clip, tiny_ckpt):
    for flags, words in ((["--layers", "all,bogus"], ["bogus"]), (["--lr", "0.01,abc"], ["--lr"]),
                         (["--consistency", "-1"], ["--consistency"]), (["--layers", "all,all"], ["different values"])):
        rc, _, err = run_cli("study", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--eval-clip", colour_clip,
                             "--iters", 2, "--n", 4, "--out", tmp_path / "s", *flags)
        assert_clean_error(rc, err, *words)
        assert not os.path.exists(tmp_path / "s")


def test_study_rerun_with_other_flags_or_fewer_iters_is_refused(tmp_path, colour_clip, tiny_ckpt, capsys):
    _study(tmp_path, colour_clip, tiny_ckpt, layers="all", consistency="0", iters=2)
    flags = ["--ckpt", tiny_ckpt, "--clip", colour_clip, "--eval-clip", colour_clip, "--tgt", "red photo", "--layers",
             "all", "--batch", 3, "--samples", 16, "--out", tmp_path / "study"]
    before = sorted(p.name for p in (tmp_path / "study").rglob("*"))
    for extra, words in ((["--iters", 2, "--lr", "0.01"], ["was trained with --lr 0.0016, not 0.01", "rerun the study"]),
                         (["--iters", 2, "--seed", "5"], ["--seed 0, not 5"]),
                         (["--iters", 1], ["is at step 2, past --iters 1", "--iters 2 or more"])):
        rc, _, err = main_in_process(capsys, "study", *flags, *extra)
        assert_clean_error(rc, err, *words)
    assert sorted(p.name for p in (tmp_path / "study").rglob("*")) == before


def test_study_measures_again_when_eval_json_is_damaged_or_from_other_settings(tmp_path, colour_clip, tiny_ckpt):
    rows = _study(tmp_path, colour_clip, tiny_ckpt, layers="all", consistency="0", iters=2)
    report = tmp_path / "study" / "all" / "eval.json"
    for damage in ("{not json", "[1, 2]", json.dumps({"n": 16})):
        report.write_text(damage)
        assert _study(tmp_path, colour_clip, tiny_ckpt, layers="all", consistency="0", iters=2) == rows
        assert json.loads(report.read_text())["clip_score"] == rows[0]["clip_score"]
    record = json.loads(report.read_text())                # the record `eval` writes, so each reads the other's
    assert record["iterations"] == 2 and record["seeds"] == "0-15" and record["tgt"] == "red photo"
    assert record["base"] == os.path.abspath(tiny_ckpt) and record["clip"] == [colour_clip]
    fewer = _study(tmp_path, colour_clip, tiny_ckpt, layers="all", consistency="0", iters=2, n=8)
    assert json.loads(report.read_text())["n"] == 8 and fewer[0]["clip_score"] != rows[0]["clip_score"]
    with open(tmp_path / "study" / "all" / "log.jsonl", "a") as f:
        f.write('[1, 2]\n{"iter": "x", "loss": 1, "seconds": 1}\n"text"\n')
    assert [e["iter"] for e in nada.read_log(tmp_path / "study" / "all")] == [0, 1]


def test_a_setting_that_fails_is_reported_and_the_others_finish(tmp_path, colour_clip, tiny_ckpt):
    rows = _study(tmp_path, colour_clip, tiny_ckpt, layers="all", consistency="0", lr="0.002,1e30", iters=3)
    ok, failed = rows
    assert ok["error"] is None and ok["clip_score"] is not None and ok["setting"] == "all, lr 0.002"
    assert "became nan" in failed["error"] and failed["clip_score"] is None and failed["setting"] == "all, lr 1e+30"
    assert nada.run_step(tmp_path / "study" / failed["folder"]) == 1        # saved every step: step 1 was saved
    from PIL import Image
    assert Image.open(tmp_path / "study" / "grid.png").size[1] == 64 * 2     # the base and the setting that ran
    assert "all, lr 1e+30 failed: the loss became nan" in (tmp_path / "study" / "results.md").read_text()
    assert json.loads((tmp_path / "study" / "results.json").read_text())["results"][1]["error"] == failed["error"]
    again = _study(tmp_path, colour_clip, tiny_ckpt, layers="all", consistency="0", lr="0.002,1e30", iters=3)
    assert again[0] == ok and "became nan at step 1" in again[1]["error"]   # the rerun resumes it, and it fails again
    (tmp_path / "study" / ok["folder"] / "generator.pt").write_bytes(b"damaged")   # now neither setting can be shown
    with pytest.raises(nada.NadaError, match="every setting failed; .*results.md says why"):
        _study(tmp_path, colour_clip, tiny_ckpt, layers="all", consistency="0", lr="0.002,1e30", iters=3)
    first = json.loads((tmp_path / "study" / "results.json").read_text())["results"][0]
    assert "generator.pt" in first["error"] and "remove" in first["error"] and first["clip_score"] is None


def test_study_folder_refusals(tmp_path, colour_clip, tiny_ckpt):
    with pytest.raises(nada.NadaError, match="share the folder 'all_lr_0p001'"):
        nada.study_settings("all", "0.001,0.00100000000001", "0")
    (tmp_path / "study" / "figures").mkdir(parents=True)     # an empty folder and a dotfile are no one's work
    (tmp_path / "study" / ".DS_Store").write_text("finder")
    (tmp_path / "study" / "thesis.tex").write_text("mine")
    with pytest.raises(nada.NadaError, match=r"holds other files \(thesis.tex\)"):
        _study(tmp_path, colour_clip, tiny_ckpt, layers="all", consistency="0", iters=1)
    assert sorted(os.listdir(tmp_path / "study")) == [".DS_Store", "figures", "thesis.tex"]
    (tmp_path / "study" / "thesis.tex").unlink()
    (tmp_path / "study" / "all").mkdir()
    (tmp_path / "study" / "all" / "config.json").write_text("{torn")
    with pytest.raises(nada.NadaError, match="config.json is damaged: remove"):
        _study(tmp_path, colour_clip, tiny_ckpt, layers="all", consistency="0", iters=1)


def test_eval_out_base_and_prompt_refusals(tmp_path, colour_clip, tiny_ckpt, red_and_blue_runs):
    run = red_and_blue_runs["red"]
    (tmp_path / "notes.txt").write_text("mine")
    cond = os.path.join(FIXTURES, "nvidia_32_cond.pkl")
    for flags, words in ((["--out", tmp_path], ["names a folder"]), (["--out", f"{tmp_path}/new/"], ["names a folder"]),
                         (["--out", tmp_path / "notes.txt"], ["a file other than an eval record"]),
                         (["--out", tiny_ckpt], ["other than an eval record"]),
                         (["--out", os.path.join(run, "config.json")], ["other than an eval record"]),
                         (["--base", cond], ["has another architecture than", "pass the generator the run adapted"]),
                         (["--base", tmp_path / "none.pt"], ["--base", "is neither a file nor a known model"]),
                         (["--src", "red photo", "--tgt", "Red Photo"], ["the same"]),
                         (["--tgt", " "], ["non-empty prompts"]),
                         (["--clip", f"{colour_clip},{colour_clip}"], ["different CLIP models"]),
                         (["--clip", ","], ["name one or more"])):
        rc, _, err = run_cli("eval", "--ckpt", run, "--clip", colour_clip, "--n", 4, *flags)
        assert_clean_error(rc, err, *words)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not os.path.exists(os.path.join(run, "eval.json"))
    assert not os.path.exists(tmp_path / "new") and json.loads(open(os.path.join(run, "config.json")).read())["iters"] == 30
    base = tmp_path / "base.pt"                                # a run whose recorded base has gone
    shutil.copy(tiny_ckpt, base)
    gone = nada.train(tgt="red photo", ckpt=str(base), out=str(tmp_path / "r"), iters=1, clip=colour_clip, progress=False)
    base.unlink()
    rc, _, err = run_cli("eval", "--ckpt", gone, "--clip", colour_clip, "--n", 4)
    assert_clean_error(rc, err, f"the base this run recorded ({base}) is missing: pass --base")
    rc, _, err = run_cli("eval", "--ckpt", gone, "--clip", colour_clip, "--n", 4, "--base", tiny_ckpt)
    assert rc == 0, err


def test_torchrun_needs_a_sample_per_process_and_a_gpu_per_process(tmp_path, colour_clip, monkeypatch, red_and_blue_runs):
    monkeypatch.setattr(nada, "distributed", lambda device, impl: (0, 3, "cpu"))
    with pytest.raises(nada.NadaError, match="--samples 2: must be at least 3"):
        nada.evaluate(red_and_blue_runs["red"], clip=colour_clip, n=2, out=str(tmp_path / "e.json"))
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(nada.NadaError, match="torchrun started process 1 on this machine, but torch sees 1 GPUs"):
        nada.distributed("auto", "auto")


def test_torchrun_study_and_eval_match_one_process(tmp_path, colour_clip, tiny_ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}   # torchrun gives each process 1 thread
    flags = ["--ckpt", tiny_ckpt, "--tgt", "red photo", "--clip", colour_clip, "--eval-clip", colour_clip, "--layers", "first:1,all",
             "--consistency", "0,4", "--iters", "3", "--batch", "3", "--samples", "16", "--grid", "2"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              os.path.join(HERE, "nada.py")]
    one = subprocess.run([sys.executable, os.path.join(HERE, "nada.py"), "study", *map(str, flags), "--out",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    two = subprocess.run([*launch, "study", *map(str, flags), "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert drop(a.pop("results")) == drop(b.pop("results")) and a == b
    assert two.stdout.count("wrote results.md") == 1                          # rank 0 alone writes
    run = tmp_path / "one" / "all_consistency_4"
    for cmd, out in (([sys.executable, os.path.join(HERE, "nada.py")], "e1.json"), (launch, "e2.json")):
        r = subprocess.run([*cmd, "eval", "--ckpt", str(run), "--clip", colour_clip, "--samples", "9", "--batch", "2",
                            "--out", str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "e1.json").read_text() == (tmp_path / "e2.json").read_text()


# ---- checkpoint files: loading, parity, hostile files -------------------------------------------------------

@pytest.mark.parametrize("name", ["rosinality_32", "nvidia_32", "nvidia_32_cond"])
def test_fixture_parity(name):
    ext = ".pt" if name.startswith("rosinality") else ".pkl"
    G = nada.load_generator(os.path.join(FIXTURES, name + ext), impl="ref")
    e = torch.load(os.path.join(FIXTURES, name + ".expected.pt"))
    c = e["c"] if "c" in e and e["c"].shape[1] else None
    with torch.no_grad():
        ws = G.mapping(e["z"], c)
        assert (G.synthesis(ws) - e["img"]).abs().max() <= 1e-4
        assert (G(e["z"], c, truncation=0.7) - e["img_trunc07"]).abs().max() <= 1e-4
        if "ws" in e:
            assert (ws - e["ws"]).abs().max() <= 1e-4
        if "z2" in e:                                     # style mixing: ws 0..2 from z, 3.. from z2
            assert (ws[:, 0] - e["w"]).abs().max() <= 1e-4
            mixed = torch.cat([ws[:, :3], G.mapping(e["z2"])[:, 3:]], 1)
            assert (G.synthesis(mixed) - e["img_mix_inject3"]).abs().max() <= 1e-4
    assert (G.z_dim, G.w_dim, G.num_ws, G.img_resolution, G.c_dim) == (64, 64, 8, 32, 10 if "cond" in name else 0)


def test_saved_checkpoint_is_rosinality_compatible_and_reloads_exactly(tmp_path):
    G = nada.load_generator(os.path.join(FIXTURES, "nvidia_32.pkl"))
    path = tmp_path / "g.pt"
    nada.save_generator(G, path, note="x")
    ckpt = torch.load(path, weights_only=True)
    rosi = torch.load(os.path.join(FIXTURES, "rosinality_32.pt"), weights_only=False)["g_ema"]
    # the same key set and per-key rank as a real rosinality checkpoint: its tools load ours with strict=True
    assert set(ckpt["g_ema"]) == set(rosi)
    assert all(ckpt["g_ema"][k].ndim == rosi[k].ndim for k in rosi)
    assert ckpt["latent_avg"].shape == (64,) and ckpt["nada"]["note"] == "x"
    G2 = nada.load_generator(path)
    assert G2.conv_clamp == 256                           # settings that shapes cannot tell survive the round trip
    z = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(G(z, truncation=0.5), G2(z, truncation=0.5))


def test_bare_state_dict_without_latent_avg_loads(tmp_path):
    sd = torch.load(os.path.join(FIXTURES, "rosinality_32.pt"), weights_only=False)["g_ema"]
    torch.save(sd, tmp_path / "bare.pt")
    G = nada.load_generator(tmp_path / "bare.pt")
    with torch.no_grad():                                 # latent_avg estimated as the mean w of 4096 seeded z
        expected = G.mapping(torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)))[:, 0].mean(0)
    assert torch.allclose(G.latent_avg, expected)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _fixture_records():
    return nada.read_g_ema(os.path.join(FIXTURES, "nvidia_32.pkl"))


def test_repickled_fixture_loads_and_architecture_refusals(tmp_path):
    G = _fixture_records()
    _persistent_pickle(tmp_path / "same.pkl", G)          # our writer is faithful: the copy loads and agrees
    z = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(nada.load_generator(tmp_path / "same.pkl")(z),
                           nada.load_generator(os.path.join(FIXTURES, "nvidia_32.pkl"))(z))
    fc1 = G.state["_modules"]["mapping"].state["_modules"].pop("fc1")
    _persistent_pickle(tmp_path / "nofc1.pkl", G)
    with pytest.raises(nada.NadaError, match="nofc1.pkl: G_ema is not a StyleGAN2 generator this loader knows"):
        nada.load_generator(tmp_path / "nofc1.pkl")
    G.state["_modules"]["mapping"].state["_modules"]["fc1"] = fc1
    G.state["_modules"]["synthesis"].state["_modules"]["b8"].state["architecture"] = "resnet"
    _persistent_pickle(tmp_path / "resnet.pkl", G)
    with pytest.raises(nada.NadaError, match="'resnet' synthesis architecture is not supported"):
        nada.load_generator(tmp_path / "resnet.pkl")
    G.state["_modules"]["synthesis"].state["_modules"]["input"] = G.state["_modules"]["mapping"]
    _persistent_pickle(tmp_path / "sg3.pkl", G)
    with pytest.raises(nada.NadaError, match="StyleGAN3"):
        nada.load_generator(tmp_path / "sg3.pkl")


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    """A folder of checkpoints that must each be refused with one clear error, and run nothing."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "evil.pkl").write_bytes(pickle.dumps({"G_ema": _Evil()}))
    torch.save({"g_ema": _Evil()}, folder / "evil.pt")

    # a legal G_ema whose nested storage bytes hide code: decoding G_ema's storages must be restricted too
    class EvilStorage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (pickle.dumps(_Evil(), protocol=2),))

    class EvilTensor:                                     # pickles as a tensor does, around that storage
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (EvilStorage(), 0, (1,), (1,), False, {}))
    _persistent_pickle(folder / "nested.pkl", types.SimpleNamespace(
        class_name="Generator", state={"_parameters": {"weight": EvilTensor()}, "_modules": {}}))
    full = open(os.path.join(FIXTURES, "nvidia_32.pkl"), "rb").read()
    (folder / "truncated.pkl").write_bytes(full[:len(full) // 2])
    (folder / "garbage.pkl").write_bytes(b"this is not a pickle at all")
    (folder / "tf.pkl").write_bytes(b"\x80\x04\x8c\x14dnnlib.tflib.network\x94\x8c\x07Network\x94\x93\x94.")
    torch.save({"g_ema": {"style.1.weight": torch.zeros(2, 2)}}, folder / "wrong.pt")
    torch.save({"weights": torch.zeros(1)}, folder / "other.pt")
    good = torch.load(os.path.join(FIXTURES, "rosinality_32.pt"), weights_only=False)
    bad = dict(good["g_ema"], **{"convs.1.conv.weight": torch.zeros(1, 64, 64, 1, 1)})
    torch.save({"g_ema": bad, "latent_avg": good["latent_avg"]}, folder / "shape.pt")
    torch.save({"g_ema": good["g_ema"], "latent_avg": torch.zeros(3)}, folder / "avg.pt")
    return folder


HOSTILE = [("evil.pkl", "posix.system"), ("evil.pt", "posix.system"), ("nested.pkl", "posix.system"),
           ("truncated.pkl", "refused"), ("garbage.pkl", "refused"), ("tf.pkl", "TensorFlow"),
           ("wrong.pt", "not a StyleGAN2 generator"), ("other.pt", "no generator found"),
           ("missing.pt", "no such file"), ("shape.pt", "do not fit"), ("avg.pt", "latent_avg is not a vector of 64")]


@pytest.mark.parametrize("name,words", HOSTILE, ids=[name for name, _ in HOSTILE])
def test_hostile_and_broken_checkpoints_raise_one_clear_error_and_run_nothing(hostile_files, monkeypatch, name, words):
    monkeypatch.chdir(hostile_files)                      # where _Evil's `touch PWNED` would land
    with pytest.raises(nada.NadaError) as e:
        nada.load_generator(hostile_files / name)
    assert name in str(e.value) and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value), str(e.value)
    assert not (hostile_files / "PWNED").exists()


def test_hostile_checkpoint_on_the_command_line_is_one_clean_error(hostile_files):
    rc, _, err = run_cli("sample", "--ckpt", hostile_files / "evil.pkl", cwd=hostile_files)
    assert_clean_error(rc, err, "evil.pkl")
    assert not (hostile_files / "PWNED").exists()


def test_loading_costs_one_copy_of_the_weights(tmp_path):
    """Meta-device construction + assign: no random init and no second copy. Only g_ema's records are read, into
    memory that becomes the weights, so the process's private memory grows by one copy of the weights."""
    arch = "128, style_dim=256, n_mlp=2, channels={r: 256 for r in (4, 8, 16, 32, 64, 128)}"
    G = eval(f"nada.Generator({arch})")
    nada.save_generator(G, tmp_path / "g.pt")
    nbytes = sum(t.numel() * t.element_size() for t in G.state_dict().values())
    code = ("import sys, torch, nada\n"
            "anon = lambda: int([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1]) * 1024\n"
            "with torch.device('meta'):\n"
            f"    nada.Generator({arch})\n"
            "a0 = anon()\nG = nada.load_generator(sys.argv[1])\nprint(anon() - a0)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.pt")], capture_output=True, text=True, cwd=HERE)
    grown = int(out.stdout.strip().splitlines()[-1])
    assert 0.5 * nbytes < grown < 1.3 * nbytes, (grown, nbytes)     # two copies would be >= 2x


def test_pickle_loading_reads_only_g_ema_from_disk(tmp_path):
    """G and D share the file with G_ema; their tensors stay on disk (here 2 x 64 MB that are never read)."""
    G = _fixture_records()
    bulky = lambda cls: types.SimpleNamespace(class_name=cls, state={"_parameters": {"w": torch.randn(16_000_000)},
                                                                      "_modules": {}})
    path = tmp_path / "snapshot.pkl"
    _persistent_pickle(path, G, extra={"G": bulky("Generator"), "D": bulky("Discriminator")})
    assert path.stat().st_size > 128e6
    code = ("import resource, sys, nada\nnada.load_generator(sys.argv[2])\n"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nnada.load_generator(sys.argv[1])\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) * 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(path), os.path.join(FIXTURES, "nvidia_32.pkl")],
                         capture_output=True, text=True, cwd=HERE)
    assert int(out.stdout.strip().splitlines()[-1]) < 16e6, out.stdout


# ---- checkpoint files: untrusted input, hostile files, fuzz ---------------------------------------------------
# Every file nada reads is untrusted: each must load, or raise one NadaError in words, within a time and memory
# bound, and run nothing. Loads happen in a subprocess with a memory cap and a per-case alarm (_WORKER).

import contextlib
import dataclasses
import errno
import io
import pickletools
import random
import re
import struct
import warnings
import zipfile
from typing import Tuple

CASE_SECONDS = 20                      # a case still running then is a hang (the worker is ended)
CASE_MEMORY = 512 << 20                # peak resident growth allowed per case (the fixtures are 1-4 MB)
ADDRESS_SPACE = 2 << 30                # RLIMIT_AS above the worker's size after imports: claims of GBs fail there

_WORKER = r'''
import faulthandler, json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import nada

def status(key):
    return int([ln for ln in open("/proc/self/status") if ln.startswith(key + ":")][0].split()[1]) * 1024

seconds, space = int(sys.argv[1]), int(sys.argv[2])
cases = json.load(open(sys.argv[3]))
nada.load_clip.__globals__["_import_clip"]()                  # imported before the cap, as in a real run
limit = status("VmSize") + space
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for kind, path in cases:
    with open("/proc/self/clear_refs", "w") as f:               # resets the peak resident size (VmHWM)
        f.write("5")
    rss, t, out = status("VmRSS"), time.perf_counter(), {"path": path}
    faulthandler.dump_traceback_later(seconds, exit=True)      # a hang, even inside C code, ends the process
    try:
        if kind == "state":                                     # as --resume and a study read a run's state.pt
            try:
                with nada.TorchFile(path) as tf:
                    tf.build(tf.load())
            except Exception as e:
                raise nada.NadaError(f"{path}: {nada._refusal(e)}") from None
        elif kind == "json":                                    # a run folder's config.json, log.jsonl, eval.json
            import os
            folder = os.path.dirname(path)
            nada.run_config(folder), nada.read_log(folder), nada.read_eval(os.path.join(folder, "eval.json"))
        else:
            dict(clip=nada.load_clip, image=nada.load_image, gen=nada.load_generator)[kind](path)
        out["outcome"] = "loaded"
    except nada.NadaError as e:
        out["outcome"], out["message"] = "error", str(e)
    except BaseException as e:
        out["outcome"], out["message"] = "crash", f"{type(e).__name__}: {e}"[:500]
    faulthandler.cancel_dump_traceback_later()
    out["seconds"], out["peak"] = time.perf_counter() - t, status("VmHWM") - rss
    print(json.dumps(out), flush=True)
'''


def _load_all(cases, folder):
    """Load each (kind, path) in a capped subprocess -> {path: result}. A case that hangs or kills the process
    is recorded as such, and the rest go on in a fresh one."""
    (folder / "worker.py").write_text(_WORKER)
    results, todo = {}, [(k, str(p)) for k, p in cases]
    while todo:
        (folder / "cases.json").write_text(json.dumps(todo))
        p = subprocess.run([sys.executable, str(folder / "worker.py"), str(CASE_SECONDS), str(ADDRESS_SPACE),
                            str(folder / "cases.json")], cwd=HERE, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": HERE, "PYTHONWARNINGS": "ignore"})
        done = [json.loads(ln) for ln in p.stdout.splitlines()]
        results.update((r["path"], r) for r in done)
        if len(done) < len(todo):                         # the next case ended the worker
            path = todo[len(done)][1]
            results[path] = {"path": path, "outcome": "hang" if "Timeout (" in p.stderr else "crash",
                             "message": p.stderr[-500:], "seconds": CASE_SECONDS, "peak": 0}
        todo = todo[len(done) + 1:]
    return results


def _assert_clean(r, *words):
    """Loaded, or one NadaError naming the file and saying in words what is wrong, fast and small."""
    msg = r.get("message", "")
    assert r["outcome"] in ("loaded", "error"), r
    if r["outcome"] == "error":
        assert os.path.basename(r["path"]) in msg and "\n" not in msg, r
        for bad in ("Traceback", "weights_only=False", "MemoryError", "allocate", "EOFError", "pop from empty"):
            assert bad not in msg, r
        assert not re.search(r": \d+$", msg), r                     # a bare opcode number says nothing
    for w in words:
        assert w in msg, r
    assert r["seconds"] < CASE_SECONDS / 2 and r["peak"] < CASE_MEMORY, r


def _persistent(class_name, modules=None, **state):
    """An object that pickles as NVIDIA's persistence does, keeping shared references shared (pickle's memo)."""
    return _Reduced(_persistence_fn, dict(type="class", version=6, module_src="# placeholder", class_name=class_name,
                                            state=dict(state, _modules=modules or {})))


class _Reduced:
    def __init__(self, fn, meta):
        self.fn, self.meta = fn, meta

    def __reduce__(self):
        return (self.fn, (self.meta,))


def _persistence_fn():
    """Stands for NVIDIA's torch_utils.persistence._reconstruct_persistent_obj while _dumps writes (never called)."""
    raise AssertionError("never called")


_persistence_fn.__module__, _persistence_fn.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"


def _dumps(obj):
    """pickle.dumps with a stand-in torch_utils.persistence module, as NVIDIA's pickles name it."""
    mod = types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _persistence_fn
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": mod})
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)                          # a 100-deep module chain
    try:
        return pickle.dumps(obj, protocol=4)
    finally:
        sys.setrecursionlimit(limit)
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)


def _dag(levels, leaf):
    x = leaf
    for _ in range(levels):
        x = [x, x]
    return x


def _hostile_pickles():
    """name -> bytes of small pickles built to exhaust a naive loader (each under 3 kB)."""
    def claim(op, fmt, n):
        return b"\x80\x05" + op + struct.pack(fmt, n) + b"ab."
    out = {f"claim_{name}.pkl": claim(op, fmt, n) for name, op, fmt, n in [
        ("bytearray8", pickle.BYTEARRAY8, "<Q", 6_000_000_000), ("binbytes8", pickle.BINBYTES8, "<Q", 6_000_000_000),
        ("binunicode8", pickle.BINUNICODE8, "<Q", 6_000_000_000), ("frame", pickle.FRAME, "<Q", 6_000_000_000),
        ("long4", pickle.LONG4, "<i", 2_000_000_000), ("binunicode", pickle.BINUNICODE, "<I", 4_000_000_000),
        ("binbytes", pickle.BINBYTES, "<I", 4_000_000_000)]}
    chain = _persistent("SynthesisLayer")
    for _ in range(100):
        chain = _persistent("SynthesisLayer", {"child": chain})
    shared = _persistent("SynthesisLayer")
    for _ in range(20):                                   # walked as a tree: 8^20 visits
        shared = _persistent("SynthesisLayer", {f"m{i}": shared for i in range(8)})
    trees = {"laughs_class_name.pkl": _persistent(_dag(60, "Generator")),
             "laughs_architecture.pkl": _persistent("Generator", {"synthesis": _persistent("SynthesisNetwork", {
                 "b4": _persistent("SynthesisBlock", architecture=_dag(60, "x"))}), "mapping": _persistent("M")},
                 img_resolution=4, c_dim=0, w_dim=8),
             "shared_subtrees.pkl": _persistent("Generator", {"synthesis": shared}),
             "deep_modules.pkl": _persistent("Generator", {"synthesis": chain}),
             "wide_modules.pkl": _persistent("Generator", {f"m{i}": _persistent("X") for i in range(5000)}),
             }
    out.update({name: _dumps({"G_ema": tree}) for name, tree in trees.items()})
    out["deep_lists.pkl"] = b"\x80\x04" + b"]" * 100_000 + b"a" * 99_999 + b"."
    # G_ema whose _modules holds G_ema itself (pickle.dumps cannot write that cycle through a reduce, so by hand)
    s = lambda text: b"X" + struct.pack("<I", len(text)) + text.encode()
    meta = (b"}(" + s("type") + s("class") + s("version") + b"K\x06" + s("class_name") + s("Generator") + s("state")
            + b"}(" + s("_modules") + b"}q\x01uu")
    out["cyclic_modules.pkl"] = (b"\x80\x02}(" + s("G_ema") + b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n"
                                 + meta + b"\x85Rq\x02h\x01" + s("self") + b"h\x02s0u.")
    # {t60: None} where t(i+1) = (t(i), t(i)) through the memo: hashing the key takes 2^60 steps (written by hand,
    # since making that dict here would hash it)
    out["hash_bomb.pkl"] = b"\x80\x02})q\x000" + b"".join(b"h%ch%c\x86q%c0" % (i, i, i + 1) for i in range(60)) + b"h<Ns."
    return out


def _hostile_checkpoints():
    """name -> (a rosinality-style checkpoint dict, with one thing wrong): our own format, malformed."""
    good = torch.load(os.path.join(FIXTURES, "rosinality_32.pt"), weights_only=False)
    G = nada.load_generator(os.path.join(FIXTURES, "rosinality_32.pt"))
    cfg = G.config()

    def ckpt(config=None, base=None, **tensors):
        meta = {"format": 1, "config": dict(cfg, **(config or {}))}
        if base is not None:
            meta["base"] = base
        return {"g_ema": dict(good["g_ema"], **tensors), "latent_avg": good["latent_avg"], "nada": meta}
    return {"stride0_6gb.pt": ckpt(**{"style.1.weight": torch.zeros(1).expand(40_000, 40_000)}),
            "stride0_4tb.pt": ckpt(**{"style.1.weight": torch.zeros(1).expand(1_000_000, 1_000_000)}),
            "stride0_right_shape.pt": ckpt(**{"convs.1.conv.weight": torch.zeros(1).expand(1, 64, 64, 3, 3)}),
            "input_1d.pt": ckpt(**{"input.input": torch.zeros(64)}),
            "config_string.pt": ckpt(config={"lr_mlp": "0.01"}),
            "config_list.pt": ckpt(config={"conv_clamp": [256]}),
            "config_nan.pt": ckpt(config={"conv_clamp": float("nan")}),
            "config_negative.pt": ckpt(config={"lr_mlp": -1.0}),
            "integer_weights.pt": ckpt(**{"style.1.weight": torch.ones(64, 64, dtype=torch.int64)}),
            "base_list.pt": ckpt(base=["ffhq"])}


HOSTILE = {  # file -> words its NadaError must say (every one must fail cleanly, fast and small)
    **{f"claim_{op}.pkl": "ends early" for op in ("bytearray8", "binbytes8", "binunicode8", "frame", "long4",
                                                  "binunicode", "binbytes")},
    "laughs_class_name.pkl": "class name", "laughs_architecture.pkl": "list", "shared_subtrees.pkl": "appears twice", "cyclic_modules.pkl": "appears twice",
    "deep_modules.pkl": "deeper than", "wide_modules.pkl": "larger than", "hash_bomb.pkl": "dictionary key",
    "hash_bomb.pt": "dictionary key", "deep_lists.pkl": "no 'G_ema'", "stride0_6gb.pt": "more data than its storage holds",
    "stride0_4tb.pt": "more data than its storage holds", "stride0_right_shape.pt": "more data than its storage holds",
    "input_1d.pt": "not a StyleGAN2", "config_string.pt": "positive number", "config_list.pt": "positive number",
    "config_nan.pt": "positive number", "config_negative.pt": "positive number",
    "integer_weights.pt": "torch.int64", "base_list.pt": "base generator", "text.pkl": "neither", "empty.pkl": "neither",
    "torchscript.pt": "TorchScript archive",
}


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    for name, data in _hostile_pickles().items():
        (folder / name).write_bytes(data)
    for name, ckpt in _hostile_checkpoints().items():
        torch.save(ckpt, folder / name)
    torch.save({"g_ema": {}}, folder / "empty_dict.pt")      # a hash bomb as data.pkl: torch.load never finishes
    with zipfile.ZipFile(folder / "empty_dict.pt") as zin, zipfile.ZipFile(folder / "hash_bomb.pt", "w") as zout:
        for n in zin.namelist():
            zout.writestr(n.replace("empty_dict/", "hash_bomb/"), zin.read(n) if not n.endswith("data.pkl") else
                          b"\x80\x02}()q\x00" + b"".join(b"h%ch%c\x86q%c" % (i, i, i + 1) for i in range(60)) + b"Nu.")
    os.remove(folder / "empty_dict.pt")
    torch.jit.script(_Scripted()).save(folder / "torchscript.pt")
    (folder / "text.pkl").write_text("a text file, not a checkpoint\n")
    (folder / "empty.pkl").write_bytes(b"")
    assert sorted(os.listdir(folder)) == sorted(HOSTILE)
    return {os.path.basename(p): r for p, r in _load_all([("gen", folder / n) for n in HOSTILE], folder).items()}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_fails_cleanly_fast_and_small(hostile_results, name):
    r = hostile_results[name]
    assert r["outcome"] == "error", r
    _assert_clean(r, HOSTILE[name])


@pytest.mark.parametrize("how", ["shared", "overlapping"])
def test_tensors_that_share_bytes_load_as_copies_of_their_own(tmp_path, how):
    """Two weights over the same (or overlapping) bytes of a file load as float32 copies of their own: a step that
    trains one never moves the other, and the copies never add up to more than the file holds."""
    good = torch.load(os.path.join(FIXTURES, "rosinality_32.pt"), weights_only=False)
    flat = torch.randn(65 * 64)
    shared = {"style.1.weight": flat[:4096].view(64, 64),
              "style.2.weight": flat[:4096].view(64, 64) if how == "shared" else flat[64:4160].view(64, 64)}
    torch.save({"g_ema": dict(good["g_ema"], **shared), "latent_avg": good["latent_avg"]}, tmp_path / "g.pt")
    G = nada.load_generator(tmp_path / "g.pt")
    a, b = G.style[1].weight, G.style[2].weight
    assert torch.equal(a, shared["style.1.weight"]) and torch.equal(b, shared["style.2.weight"])
    with torch.no_grad():
        a.add_(1.0)
    assert torch.equal(b, shared["style.2.weight"])


@pytest.mark.parametrize("cut", [1, 2, 100, 1000, 5000, 70_000, 500_000, 1_500_000, 3_000_000, -1])
def test_truncated_pickle_says_so_in_words(tmp_path, cut):
    data = open(os.path.join(FIXTURES, "nvidia_32.pkl"), "rb").read()
    (tmp_path / "cut.pkl").write_bytes(data[:cut])
    with pytest.raises(nada.NadaError, match=r"cut\.pkl: .*the file ends early: it is truncated"):
        nada.load_generator(tmp_path / "cut.pkl")


def test_text_file_as_ckpt_or_clip_says_what_it_is(tmp_path, tiny_ckpt):
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    rc, _, err = run_cli("sample", "--ckpt", text, cwd=tmp_path)
    assert_clean_error(rc, err, "notes.txt", "neither a network pickle nor a torch checkpoint")
    rc, _, err = run_cli("train", "--ckpt", tiny_ckpt, "--clip", text, "--iters", 1, "--out", tmp_path / "run",
                         cwd=tmp_path)
    assert_clean_error(rc, err, "notes.txt", "neither a TorchScript archive nor a torch.save'd state dict")


def _tiny_clip(vision_layers, resolution, seed=0):
    nada._import_clip()
    from clip.model import CLIP
    torch.manual_seed(seed)
    return CLIP(embed_dim=64, image_resolution=resolution, vision_layers=vision_layers, vision_width=64,
                vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                transformer_layers=1).eval()


def test_prompts_are_encoded_once_on_the_shortest_context_with_the_full_contexts_result():
    """Both prompts in one batch of 2 x 80 templates, cut after the longest prompt's end-of-text token: the same
    embeddings as CLIP on its full 77 tokens (its text transformer is causal), from one call of the text tower."""
    clip, model = nada._import_clip(), _tiny_clip(1, 32)
    model.transformer = torch.nn.Sequential(*[_tiny_clip(1, 32, seed).transformer.resblocks[0] for seed in range(3)])
    for block in model.transformer:                     # three random layers, so that attention mixes positions
        block.attn_mask = model.build_attention_mask()
    texts, calls = ["photo", "a red and rather long photograph of something"], []
    encode = model.encode_text
    model.encode_text = lambda tokens: calls.append(tokens.shape) or encode(tokens)
    short = nada.encode_prompts(model, texts)
    with torch.no_grad():
        full = torch.stack([F.normalize(encode(clip.tokenize([t.format(x) for t in nada.IMAGENET_TEMPLATES])), dim=-1)
                            for x in texts])
    longest = max(len(clip.tokenize(t.format(texts[1]))[0].nonzero()) for t in nada.IMAGENET_TEMPLATES)
    assert calls == [(160, longest)] and longest < 30
    assert short.shape == (2, 80, 64) and torch.allclose(short, full, atol=1e-6)
    direction, target = nada.text_targets(model, *texts)
    assert torch.allclose(direction, F.normalize((full[1] - full[0]).mean(0), dim=0), atol=1e-6)
    assert torch.allclose(target, F.normalize(full[1].mean(0), dim=0), atol=1e-6)

    def openai_clip(tokens):                              # OpenAI's own clip package adds all 77 positions
        if tokens.shape[1] != 77:
            raise RuntimeError(f"The size of tensor a ({tokens.shape[1]}) must match the size of tensor b (77)")
        return encode(tokens)
    model.encode_text = openai_clip
    assert torch.allclose(nada.encode_prompts(model, texts), full, atol=1e-6)


@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_torchscript_clip_is_read_as_data_and_matches_jit_load(tmp_path, variant):
    """OpenAI's CLIP files are traced TorchScript archives: nada reads their tensors without running the archive,
    and gets exactly torch.jit.load's state dict and clip.load's embeddings (of the file's float32 weights)."""
    import clip
    vision_layers, res = (1, 32) if variant == "vit" else ((1, 1, 1, 1), 64)
    m = _tiny_clip(vision_layers, res)
    img, tokens = torch.randn(2, 3, res, res), clip.tokenize(["a red photo", "blue"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(m, (img, tokens)).save(tmp_path / "traced.pt")
        expected = torch.jit.load(tmp_path / "traced.pt").state_dict()
        reference = clip.load(str(tmp_path / "traced.pt"), device="cpu", jit=False)[0].float()
        reference.load_state_dict(expected)             # clip.load rounds weights to float16; nada keeps the file's
    sd = nada.read_clip_weights(str(tmp_path / "traced.pt"))
    assert sd.keys() == expected.keys()
    assert all(torch.equal(sd[k], expected[k]) and sd[k].dtype == expected[k].dtype for k in sd)
    model = nada.load_clip(str(tmp_path / "traced.pt"))
    with torch.no_grad():
        assert torch.equal(model.encode_image(img), reference.encode_image(img))
        assert torch.equal(model.encode_text(tokens), reference.encode_text(tokens))


class _Scripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.register_buffer("buf", torch.ones(2))
        self.extra = torch.zeros(5)                       # a plain tensor attribute: not in the state dict

    def forward(self, x):
        return self.lin(x) + self.extra.sum()


class _Loud(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.ones(2)

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]):
        print("SETSTATE RAN")                             # code in the file: torch.jit.load runs it
        self.w = state[0]
        self.training = state[1]

    def forward(self, x):
        return x * self.w


def test_scripted_archive_state_dict_matches_jit_load(tmp_path):
    torch.jit.script(_Scripted()).save(tmp_path / "scripted.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.jit.load(tmp_path / "scripted.pt").state_dict()
    with nada.TorchFile(str(tmp_path / "scripted.pt")) as tf:
        sd = nada._archive_state_dict(tf)
    assert sorted(sd) == sorted(expected) == ["buf", "lin.bias", "lin.weight"]
    assert all(torch.equal(sd[k], expected[k]) for k in sd)


class _System:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("case", ["scripted_setstate", "data_pkl_global", "storage_claim", "stride0_tensor"])
def test_hostile_clip_archive_runs_nothing(tmp_path, capfd, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{case}.pt"
    if case == "scripted_setstate":
        torch.jit.script(_Loud()).save(path)
        words = "restores itself with code"
    else:
        import clip
        m = _tiny_clip(1, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(m, (torch.randn(1, 3, 32, 32), clip.tokenize(["x"]))).save(tmp_path / "good.pt")
        zin = zipfile.ZipFile(tmp_path / "good.pt")
        data = zin.read("good/data.pkl")
        if case == "data_pkl_global":
            data, words = pickle.dumps(_System(), protocol=2), "posix.system"
        elif case == "storage_claim":                     # a 4928-element tensor claims 2^31 elements
            data, words = data.replace(b"M@\x13", b"J\x00\x00\x00\x40", 1), "damaged"
        else:                                             # positional_embedding [77, 64] -> [77, 64000], stride 0
            data = data.replace(b"KMK@t(K@K\x01t", b"KMJ\x00\xfa\x00\x00t(K@K\x00t", 1)
            words = "more data than its storage"
        assert data != zin.read("good/data.pkl")
        with zipfile.ZipFile(path, "w") as zout:
            for n in zin.namelist():
                zout.writestr(n.replace("good/", f"{case}/"), data if n.endswith("/data.pkl") else zin.read(n))
    with pytest.raises(nada.NadaError) as e:
        nada.load_clip(str(path))
    assert f"{case}.pt" in str(e.value) and words in str(e.value), str(e.value)
    assert "SETSTATE RAN" not in capfd.readouterr().out and not (tmp_path / "PWNED").exists()


# The fuzz test: seeded, bounded mutations of every fixture (and of a tiny traced CLIP archive), plus the hostile
# pickles above. NADA_FUZZ_CASES sets the number of mutated files (default: about a minute on two CPU cores).

def _length_fields(data, base=0):
    """(offset, width) of every length field in a pickle stream (skipping what it cannot parse)."""
    widths = {"BINBYTES": 4, "BINBYTES8": 8, "BYTEARRAY8": 8, "BINUNICODE": 4, "BINUNICODE8": 8, "BINSTRING": 4,
              "LONG4": 4, "FRAME": 8, "SHORT_BINUNICODE": 1, "SHORT_BINBYTES": 1, "SHORT_BINSTRING": 1, "LONG1": 1}
    out = []
    with contextlib.suppress(Exception):
        for op, _, pos in pickletools.genops(data):
            if op.name in widths:
                out.append((base + pos + 1, widths[op.name]))
    return out


def _targets(data):
    """Length fields and tensor records of a fixture: a pickle's own stream, or each pickle and record of a zip."""
    if not data.startswith(b"PK"):
        fields = _length_fields(data)
        records = [(o + w, 256) for o, w in fields if w >= 4][:200]   # the start of each nested storage save
        return fields, records
    fields, records = [], []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
            if info.filename.endswith(".pkl"):
                fields += _length_fields(data[start:start + info.file_size], start)
            else:
                records.append((info.header_offset, 30 + min(info.file_size, 64)))   # zip header and first values
    return fields, records


def _mutate(data, targets, rng):
    fields, records = targets
    kind = rng.choice(["truncate", "flip", "zero", "swap", "length", "record"])
    b, n = bytearray(data), len(data)
    if kind == "truncate":
        return kind, bytes(b[:rng.randrange(n)])
    if kind == "flip":
        for _ in range(rng.choice([1, 2, 8, 64])):
            b[rng.randrange(n)] ^= rng.randrange(1, 256)
    elif kind == "zero":
        i, k = rng.randrange(n), rng.choice([1, 8, 256, 4096, 65536])
        b[i:i + k] = bytes(len(b[i:i + k]))
    elif kind == "swap":
        k = rng.choice([4, 64, 1024])
        i, j = sorted(rng.randrange(n - k) for _ in range(2))
        if j >= i + k:
            b[i:i + k], b[j:j + k] = b[j:j + k], b[i:i + k]
    elif kind == "length" and fields:
        o, w = rng.choice(fields)
        old = int.from_bytes(b[o:o + w], "little")
        new = rng.choice([0, 1, old - 1, old + 1, old * 2, 2 ** (8 * w) - 1, 2 ** (8 * w - 1), rng.randrange(2 ** (8 * w))])
        b[o:o + w] = (new % 2 ** (8 * w)).to_bytes(w, "little")
    elif kind == "record" and records:
        o, k = rng.choice(records)
        for _ in range(rng.choice([1, 4])):
            b[min(o + rng.randrange(k), n - 1)] ^= rng.randrange(1, 256)
    return kind, bytes(b)


def _round_three_cases(folder, rng, n, sources):
    """[(kind, path)]: zip containers rebuilt with repeated names, inflating records, records outside the root and
    a stream in front (polyglots); fixtures read as a run's state.pt; images that declare any size; run folders whose
    config.json, log.jsonl and eval.json are nested deep or hold values of other types."""
    zips = {f: d for f, d in sources.items() if d[:2] == b"PK"}
    legacy = io.BytesIO()
    torch.save({"step": 1}, legacy, _use_new_zipfile_serialization=False)
    cases = []
    for i in range(n):
        kind, path = ["zip", "state", "image", "json"][i % 4], folder / f"r3_{i:04d}"
        if kind in ("zip", "state"):
            name = rng.choice(sorted(zips))
            data = zips[name] if kind == "zip" or rng.random() < 0.5 else _mutate(zips[name], _targets(zips[name]), rng)[1]
            if kind == "zip":
                src = folder / f"r3_{i:04d}_src.pt"
                src.write_bytes(data)
                members = zipfile.ZipFile(src).namelist()
                pick = rng.choice(members)
                how = rng.choice(["repeat", "inflate", "outside", "polyglot"])
                size = rng.choice([10, 1 << 20, 50 << 20, 300 << 20])
                path = _zip_with(src, folder / f"r3_{i:04d}_{how}_{name}", **{
                    "repeat": dict(extra=[(pick, os.urandom(rng.randrange(1, 64)))]),
                    "inflate": dict(replace={pick: bytes(size)}, compress=zipfile.ZIP_DEFLATED),
                    "outside": dict(extra=[(f"other/{pick.split('/', 1)[1]}", b"x")]),
                    "polyglot": dict()}[how])
                if how == "polyglot":
                    path.write_bytes(legacy.getvalue() + path.read_bytes())
                cases.append(("clip" if name == "clip.pt" else "gen", path))
            else:
                path.with_suffix(".pt").write_bytes(data)
                cases.append(("state", path.with_suffix(".pt")))
        elif kind == "image":
            w, h = rng.choice([1, 7, 5000, 9000, 20000, 65535]), rng.choice([1, 9, 3000, 9000, 65535])
            data = bytearray(_png(path.with_suffix(".png"), w, h).read_bytes())
            if rng.random() < 0.5:                            # and some damage after the header
                data[rng.randrange(33, len(data))] ^= 0xFF
            path.with_suffix(".png").write_bytes(bytes(data))
            cases.append(("image", path.with_suffix(".png")))
        else:
            path.mkdir()
            deep = "[" * rng.choice([10, 5000, 100_000])
            value = rng.choice([deep, '"text"', "1e308", "-1", "[1, 2]", '{"a": null}', "2.5", "true"])
            key = rng.choice(["src", "iters", "batch", "clip", "clip_weights", "tgt_img", "lr", "cls"])
            (path / "config.json").write_text(f'{{"{key}": {value}}}' if rng.random() < 0.8 else deep)
            (path / "log.jsonl").write_text(f'{{"iter": {value}, "loss": 1, "seconds": 1}}\n{deep}\n')
            (path / "eval.json").write_text(f'{{"clip_score": {value}, "per_clip": {value}}}')
            cases.append(("json", path / "config.json"))
    return cases


def test_fuzz_every_fixture_loads_or_fails_cleanly(tmp_path, capsys):
    import clip
    n_cases = int(os.environ.get("NADA_FUZZ_CASES", 1000))
    rng = random.Random(int(os.environ.get("NADA_FUZZ_SEED", 12)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_tiny_clip(1, 32), (torch.randn(1, 3, 32, 32), clip.tokenize(["x"]))).save(tmp_path / "c.pt")
    sources = {f: open(os.path.join(FIXTURES, f), "rb").read() for f in sorted(os.listdir(FIXTURES))
               if f.endswith((".pkl", ".pt"))}
    sources["clip.pt"] = (tmp_path / "c.pt").read_bytes()
    targets = {f: _targets(d) for f, d in sources.items()}
    cases, kinds = [], {}
    for i in range(n_cases):
        src = list(sources)[i % len(sources)]
        kinds[i], data = _mutate(sources[src], targets[src], rng)
        path = tmp_path / f"case{i:05d}_{kinds[i]}_{src}"
        path.write_bytes(data)
        cases.append(("clip" if src == "clip.pt" else "gen", path))
    for name, data in _hostile_pickles().items():
        (tmp_path / name).write_bytes(data)
        cases.append(("gen", tmp_path / name))
    cases += _round_three_cases(tmp_path, rng, n_cases // 5, sources)
    results = _load_all(cases, tmp_path)
    failures = []
    for r in results.values():
        try:
            _assert_clean(r)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0][:400])
    outcomes = [r["outcome"] for r in results.values()]
    slow, big = (max(results.values(), key=lambda r: r[k]) for k in ("seconds", "peak"))
    with capsys.disabled():
        print(f"\nfuzz: {len(cases)} cases ({n_cases} mutated, {n_cases // 5} containers, state files, images and "
              f"JSON files, {len(cases) - n_cases - n_cases // 5} hostile): "
              f"{outcomes.count('error')} clean errors, {outcomes.count('loaded')} loads; worst time "
              f"{slow['seconds']:.2f} s ({os.path.basename(slow['path'])}), worst memory {big['peak'] / 2**20:.1f} MB "
              f"({os.path.basename(big['path'])})")
    assert not failures, f"{len(failures)} cases failed:\n" + "\n".join(failures[:30])


def test_pre_1_6_torch_save_checkpoint_loads(tmp_path):
    """Files torch.save wrote before the zip format go through the same dry run, then torch.load."""
    good = torch.load(os.path.join(FIXTURES, "rosinality_32.pt"), weights_only=False)
    torch.save({"g_ema": good["g_ema"], "latent_avg": good["latent_avg"]}, tmp_path / "old.pt",
               _use_new_zipfile_serialization=False)
    z = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(nada.load_generator(tmp_path / "old.pt")(z),
                           nada.load_generator(os.path.join(FIXTURES, "rosinality_32.pt"))(z))


# ---- downloads ----------------------------------------------------------------------------------------------

def test_download_resumes_after_a_cut_and_verifies(tmp_path):
    data = os.urandom(300_000)
    srv = _Server({"w.bin": data}, cut=True)
    try:
        dest = str(tmp_path / "w" / "w.bin")
        with pytest.raises(nada.NadaError, match="broke off"):
            nada.download(srv.url + "/w.bin", dest)
        assert not os.path.exists(dest) and 0 < os.path.getsize(dest + ".part") < len(data)
        assert nada.download(srv.url + "/w.bin", dest) == dest
        assert open(dest, "rb").read() == data and not os.path.exists(dest + ".part")
        assert srv.requests[-1][1] is not None and srv.requests[-1][1].startswith("bytes=")
        manifest = json.load(open(tmp_path / "w" / "manifest.json"))
        assert manifest["w.bin"]["size"] == len(data)
        assert nada.download(srv.url + "/w.bin", dest) == dest and len(srv.requests) == 2   # present: no request
    finally:
        srv.close()


def test_download_progress_bar_and_server_without_ranges(tmp_path, monkeypatch):
    import tqdm
    bars = []

    class Recorder:
        def __init__(self, total=None, initial=0, **kw):
            self.total, self.initial, self.n = total, initial, initial
            bars.append(self)

        def update(self, k):
            self.n += k

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass
    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    data = os.urandom(100_000)
    srv = _Server({"w.bin": data}, cut=True, ranges=False)
    try:
        dest = str(tmp_path / "w.bin")
        with pytest.raises(nada.NadaError, match="run again to resume"):
            nada.download(srv.url + "/w.bin", dest)
        assert nada.download(srv.url + "/w.bin", dest) == dest and open(dest, "rb").read() == data
    finally:
        srv.close()
    # the second try asked for a range, got the whole file (200) and started over from byte 0
    assert srv.requests[1][1] is not None
    assert bars[0].total == len(data) and 0 < bars[0].n < len(data)
    assert (bars[1].initial, bars[1].total, bars[1].n) == (0, len(data), len(data))


def test_download_hash_mismatch_is_refused_and_removed(tmp_path):
    srv = _Server({"w.bin": b"x" * 1000})
    try:
        dest = str(tmp_path / "w.bin")
        with pytest.raises(nada.NadaError, match="SHA-256 mismatch"):
            nada.download(srv.url + "/w.bin", dest, sha256="0" * 64)
        assert os.listdir(tmp_path) == []
    finally:
        srv.close()


def test_offline_and_unreachable_fail_fast_with_instructions(tmp_path):
    t0 = time.time()
    rc, _, err = run_cli("sample", "--ckpt", "ffhq", "--weights-dir", tmp_path / "empty", "--offline")
    assert_clean_error(rc, err, "ffhq.pkl", "yourself", str(tmp_path / "empty"))
    rc, _, err = run_cli("sample", "--ckpt", "ffhq", "--weights-dir", tmp_path / "empty",
                         env={"NADA_OFFLINE": "1", "NADA_MIRROR": "http://127.0.0.1:9"})
    assert_clean_error(rc, err, "nada is offline")
    rc, _, err = run_cli("sample", "--ckpt", "ffhq", "--weights-dir", tmp_path / "empty",
                         env={"NADA_MIRROR": "http://127.0.0.1:9"})        # nothing listens on port 9
    assert_clean_error(rc, err, "could not download ffhq.pkl", "yourself and place it at")
    assert time.time() - t0 < 60
    left = os.listdir(tmp_path / "empty") if (tmp_path / "empty").exists() else []
    assert not any(f.endswith(".pkl") for f in left)     # nothing under a final name


def test_one_message_names_every_missing_file(tmp_path):
    """Offline, the README's first command names all it lacks at once; online, a failed download names the rest."""
    w = tmp_path / "w"
    rc, _, err = run_cli("train", "--ckpt", "ffhq", "--clip", "ViT-B/32,RN50", "--weights-dir", w, "--offline",
                         "--out", tmp_path / "r")
    assert_clean_error(rc, err, f"nada is offline (--offline or NADA_OFFLINE) and {w} lacks 3 file(s): ffhq: "
                       f"{nada.GENERATORS['ffhq'][0]} (about 364 MB) as ffhq.pkl; ViT-B/32: ", "(about 338 MB) as "
                       "ViT-B-32.pt; RN50: ", "(about 244 MB) as RN50.pt. Fetch them yourself into that folder")
    srv = _Server({"cifar10.pkl": open(os.path.join(FIXTURES, "nvidia_32_cond.pkl"), "rb").read()})
    try:
        rc, out, err = run_cli("train", "--ckpt", "cifar10", "--clip", "RN50,ViT-B/32", "--weights-dir", w, "--out",
                               tmp_path / "r", env={"NADA_MIRROR": srv.url})
    finally:
        srv.close()
    assert "downloading 3 file(s) into" in out, out
    assert_clean_error(rc, err, "could not download RN50.pt (HTTP 404", f"Still missing in {w}: RN50: ",
                       "(about 244 MB); ViT-B/32: ")
    assert sorted(os.listdir(w)) == ["cifar10.pkl", "manifest.json"] and not (tmp_path / "r").exists()


def test_named_model_end_to_end_through_a_mirror(tmp_path):
    data = open(os.path.join(FIXTURES, "nvidia_32_cond.pkl"), "rb").read()
    srv = _Server({"cifar10.pkl": data})
    try:
        env = {"NADA_MIRROR": srv.url}
        rc, out, err = run_cli("sample", "--ckpt", "cifar10", "--class", "ship", "--n", 2, "--weights-dir", tmp_path / "w",
                               "--out", tmp_path / "s", env=env)
        assert rc == 0, err
        assert open(tmp_path / "w" / "cifar10.pkl", "rb").read() == data
        assert sorted(os.listdir(tmp_path / "s")) == ["grid.png", "seed0000.png", "seed0001.png"]
        rc, out, _ = run_cli("models", "--weights-dir", tmp_path / "w")
        assert rc == 0 and any(ln.startswith("cifar10") and "downloaded" in ln for ln in out.splitlines())
    finally:
        srv.close()


def test_a_file_under_a_named_models_name_must_be_that_model(tmp_path, tiny_ckpt, colour_clip):
    """A 32 px generator saved as weights/ffhq.pkl is refused by every command that loads `ffhq`, not trained on."""
    (tmp_path / "w").mkdir()
    shutil.copy(tiny_ckpt, tmp_path / "w" / "ffhq.pkl")
    for args in (["train", "--tgt", "red photo", "--clip", colour_clip, "--out", tmp_path / "run"],
                 ["sample", "--out", tmp_path / "s"]):
        rc, _, err = run_cli(*args, "--ckpt", "ffhq", "--weights-dir", tmp_path / "w", "--offline")
        assert_clean_error(rc, err, f"{tmp_path / 'w' / 'ffhq.pkl'} is a 32 px generator with no classes, but ffhq is "
                           "1024 px with no classes: move the file away")
    assert sorted(os.listdir(tmp_path)) == ["w"]


# ---- run folders: settings checks, resume, Ctrl-C ------------------------------------------------------------

def test_parse_seeds():
    assert nada.parse_seeds("0-3,7") == [0, 1, 2, 3, 7]


@pytest.mark.parametrize("bad", ["3-1", "a", "1,,2"])
def test_parse_seeds_refuses(bad):
    with pytest.raises(nada.NadaError, match="--seeds"):
        nada.parse_seeds(bad)


def test_resume_equals_uninterrupted(tmp_path, colour_clip, tiny_ckpt):
    kw = dict(src="photo", tgt="red photo", ckpt=tiny_ckpt, layers="auto", auto_k=3, mixing=0.5, clip=colour_clip,
              progress=False, save_every=3, sample_every=1000)
    full = nada.train(out=str(tmp_path / "full"), iters=6, **kw)
    part = nada.train(out=str(tmp_path / "part"), iters=3, **kw)
    nada.train(out=None, iters=6, resume=part, **kw)
    a = torch.load(os.path.join(full, "generator.pt"), weights_only=True)["g_ema"]
    b = torch.load(os.path.join(part, "generator.pt"), weights_only=True)["g_ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(ln)["loss"] for ln in open(os.path.join(d, "log.jsonl"))] for d in (full, part)]
    assert logs[0] == logs[1]


def test_run_from_before_consistency_resumes(tmp_path, colour_clip, tiny_ckpt):
    rc, _, err = run_cli(*train_args(tmp_path, colour_clip, tiny_ckpt), "--tgt", "red photo")
    assert rc == 0, err
    config = tmp_path / "ok" / "config.json"
    old = json.loads(config.read_text())
    del old["consistency"]                                   # as an older nada wrote it
    config.write_text(json.dumps(old))
    rc, _, err = run_cli("train", "--resume", tmp_path / "ok", "--iters", 3)
    assert rc == 0, err
    assert [json.loads(ln)["iter"] for ln in open(tmp_path / "ok" / "log.jsonl")] == [0, 1, 2]


def test_ctrl_c_saves_and_resume_finishes(tmp_path, colour_clip, tiny_ckpt):
    out = tmp_path / "run"
    args = [sys.executable, os.path.join(HERE, "nada.py"), "train", "--ckpt", tiny_ckpt, "--clip", colour_clip,
            "--tgt", "red photo", "--iters", "100000", "--layers", "all", "--out", str(out), "--save-every", "100000"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    logged = lambda: len(open(out / "log.jsonl").readlines()) if (out / "log.jsonl").exists() else 0
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and logged() < 3:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted: saved at step" in stdout
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    assert step >= 3 and torch.load(out / "generator.pt", weights_only=True)["nada"]["iterations"] == step
    # the run's settings come from its config.json; only what changes is typed
    rc, stdout, err = run_cli("train", "--resume", out, "--iters", step + 2, "--save-every", "100000")
    assert rc == 0, err
    assert "'photo' -> 'red photo'" in stdout and str(colour_clip) in stdout
    assert len(open(out / "log.jsonl").readlines()) == step + 2


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, colour_clip, tiny_ckpt, monkeypatch):
    real = nada.directional_loss
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) > 4 else 1)
    monkeypatch.setattr(nada, "directional_loss", flaky)
    with pytest.raises(nada.NadaError, match=r"became nan at step 4.*\(step 4\)"):
        nada.train(tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / "n"), iters=10, layers="all", clip=colour_clip,
                   progress=False, save_every=2)
    assert torch.load(tmp_path / "n" / "generator.pt", weights_only=True)["nada"]["iterations"] == 4


def test_train_refuses_to_resume_with_other_settings_or_to_reuse_a_run_folder(tmp_path, colour_clip, tiny_ckpt):
    base = train_args(tmp_path, colour_clip, tiny_ckpt)
    rc, _, err = run_cli(*base, "--tgt", "red photo", cwd=tmp_path)
    assert rc == 0, err
    rc, _, err = run_cli(*base, "--tgt", "red photo", "--resume", tmp_path / "ok", "--lr", "0.1", cwd=tmp_path)
    assert_clean_error(rc, err, "--lr")
    rc, _, err = run_cli(*base, "--tgt", "red photo", cwd=tmp_path)
    assert_clean_error(rc, err, "holds a run already")


# ---- run folders and flags: bad input, one clear error, nothing left behind; locks; signals -------------

def main_in_process(capsys, *args):
    """nada.main in this process (faster than a subprocess) -> (exit code, stdout, stderr)."""
    rc = nada.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_out_folder_with_other_files_is_refused_and_left_alone(tmp_path, capsys, colour_clip, tiny_ckpt):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text("{}")
    rc, _, err = main_in_process(capsys, *train_args(tmp_path, colour_clip, tiny_ckpt), "--out", out)
    assert_clean_error(rc, err, "holds other files (notes.txt)", "--out")
    assert sorted(os.listdir(out)) == ["config.json", "notes.txt"] and (out / "config.json").read_text() == "{}"
    killed = tmp_path / "killed"                              # what a run killed before its first save leaves
    (killed / "samples").mkdir(parents=True)
    (killed / "config.json").write_text("{}")
    (killed / ".tmp-abc").write_text("")
    rc, _, err = main_in_process(capsys, *train_args(tmp_path, colour_clip, tiny_ckpt), "--out", killed)
    assert rc == 0, err
    assert os.path.isfile(killed / "state.pt") and not os.path.exists(killed / ".tmp-abc")


def test_a_failure_while_opening_the_run_folder_leaves_nothing(tmp_path, colour_clip, tiny_ckpt, monkeypatch):
    def full_disk(path, text):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(nada, "atomic_write_text", full_disk)   # config.json, written once the lock is held
    with pytest.raises(OSError):
        nada.train(src="photo", tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / "run"), iters=1, clip=colour_clip,
                   progress=False)
    assert not os.path.exists(tmp_path / "run")                # the folder made for the run is gone, lock and all


LONG_PROMPT = "a very long prompt " * 30


@pytest.mark.parametrize("extra,words", [
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--mixing", "nan"], "--mixing nan: must be a finite number"),
    (["--consistency", "nan"], "--consistency nan: must be a finite number"),
    (["--consistency", "-1"], "--consistency -1.0: must be at least 0"),
    (["--seed", "1180591620717411303424"], "--seed 1180591620717411303424: must be between 0 and"),
    (["--device", "cuda:3"], "--device cuda:3, but torch sees"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--impl", "cuda", "--device", "cpu"], "--impl cuda runs the CUDA kernels, which need --device cuda"),
    (["--n-sample", "100000"], "--n-sample 100000: must be between 1 and 64"),
    (["--auto-k", "0"], "--auto-k 0: must be 1..8"),
    (["--tgt", LONG_PROMPT], "does not fit CLIP's 77 tokens"),
    (["--iters", "0"], "--iters 0: must be at least 1"),
    (["--consistency", "1", "--batch", "1"], "--consistency compares the images of a batch with each other"),
    (["--clip", ","], "name one or more different CLIP models"),
])
def test_train_flags_are_checked_before_anything_is_written(tmp_path, capsys, colour_clip, tiny_ckpt, extra, words):
    if "--device" in extra and extra[extra.index("--device") + 1] == "cuda:3" and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a fourth GPU")
    out = tmp_path / "run"
    rc, _, err = main_in_process(capsys, "train", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--tgt", "red photo",
                                 "--iters", 2, "--out", out, *extra)
    assert_clean_error(rc, err, words)
    assert not out.exists()


@pytest.mark.parametrize("make,words", [
    (lambda p: None, "no interrupted run there"),
    (lambda p: p.write_text("x"), "no interrupted run there"),
    (lambda p: (p.mkdir(), (p / "state.pt").write_bytes(b"x"), (p / "config.json").write_text("{not json")),
     "config.json is unreadable"),
])
def test_resume_of_something_that_is_not_a_run_fails_first(tmp_path, capsys, make, words):
    """Checked before any model is loaded: with no file and no network, a late check would fail on a download."""
    make(tmp_path / "r")
    rc, _, err = main_in_process(capsys, "train", "--resume", tmp_path / "r", "--weights-dir", tmp_path / "w", "--offline")
    assert_clean_error(rc, err, words)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("extra,words", [
    (["--trunc", "nan"], "--trunc nan: must be a finite number"),
    (["--n", "1000000000"], "--n 1000000000: must be between 1 and 100000"),
    (["--seeds", "0-100000000000"], "seeds go up to 4294967295, and one call renders at most 100000 images"),
    (["--seeds", "4294967296"], "seeds go up to"),
    (["--device", "cuda:3"], "--device cuda:3, but torch sees"),
])
def test_sample_flags_are_checked_before_anything_is_written(tmp_path, capsys, tiny_ckpt, extra, words):
    if "cuda:3" in extra and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a fourth GPU")
    rc, _, err = main_in_process(capsys, "sample", "--ckpt", tiny_ckpt, "--out", tmp_path / "s", *extra)
    assert_clean_error(rc, err, words)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_sample_out_that_cannot_be_written(tmp_path, capsys, tiny_ckpt, where):
    out = tmp_path / "taken.png" if where == "file" else "/proc/nada_cannot_write"
    if where == "file":
        out.write_bytes(b"keep me")
    rc, _, err = main_in_process(capsys, "sample", "--ckpt", tiny_ckpt, "--n", 1, "--out", out)
    assert_clean_error(rc, err, "cannot write the output folder")
    if where == "file":
        assert out.read_bytes() == b"keep me"


def test_train_out_that_is_a_file(tmp_path, capsys, colour_clip, tiny_ckpt):
    (tmp_path / "f").write_text("keep me")
    rc, _, err = main_in_process(capsys, "train", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--tgt", "red photo",
                                 "--out", tmp_path / "f")
    assert_clean_error(rc, err, "is a file, not a folder")
    assert (tmp_path / "f").read_text() == "keep me"


def test_out_of_memory_is_one_clear_error_and_leaves_no_run_behind(tmp_path, capsys, colour_clip, tiny_ckpt, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 400000000000 bytes.")
    monkeypatch.setattr(nada, "train_step", oom)
    rc, _, err = main_in_process(capsys, "train", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--tgt", "red photo",
                                 "--batch", 20000, "--out", tmp_path / "run")
    assert_clean_error(rc, err, "out of memory", "lower --batch")
    assert not (tmp_path / "run").exists()


def test_a_huge_lr_says_nothing_was_saved(tmp_path, colour_clip, tiny_ckpt):
    with pytest.raises(nada.NadaError, match=r"became nan at step \d+; stopped\. Nothing was saved yet"):
        nada.train(tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / "r"), iters=5, lr=1e30, layers="all",
                   clip=colour_clip, progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("nan_at, says", [(3, "The last good checkpoint (step 2) is in"),
                                          (2, "(step 2) gives that loss too: start again")])
def test_a_nan_loss_names_the_last_good_checkpoint_only_when_it_is_good(tmp_path, colour_clip, tiny_ckpt, monkeypatch,
                                                                        nan_at, says):
    """The weights saved after 2 steps give step 2's loss: with a NaN there, that checkpoint is not a good one."""
    step, calls = nada.train_step, []

    def nan_at_step(*a, **k):
        layers, loss, losses = step(*a, **k)
        calls.append(1)
        return (layers, math.nan, losses) if len(calls) - 1 == nan_at else (layers, loss, losses)
    monkeypatch.setattr(nada, "train_step", nan_at_step)
    with pytest.raises(nada.NadaError) as e:
        nada.train(tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / "r"), iters=6, save_every=2, clip=colour_clip,
                   progress=False)
    assert f"became nan at step {nan_at}; stopped. " in str(e.value) and says in str(e.value)


def test_resume_bookkeeping(tmp_path, capsys, colour_clip, tiny_ckpt, monkeypatch):
    """--iters grows a run and config.json follows; a finished run does nothing; fewer steps is refused; a
    relative --ckpt is stored absolute, so the run resumes from another folder."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.link(tiny_ckpt, tmp_path / "a" / "g.pt")
    monkeypatch.chdir(tmp_path / "a")
    base = ["--clip", colour_clip, "--layers", "all", "--save-every", 1000]
    rc, _, err = main_in_process(capsys, "train", "--ckpt", "g.pt", "--tgt", "red photo", "--iters", 2, "--out",
                                 tmp_path / "run", *base)
    assert rc == 0, err
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert cfg["ckpt"] == str(tmp_path / "a" / "g.pt") and cfg["iters"] == 2
    monkeypatch.chdir(tmp_path / "b")
    rc, out, err = main_in_process(capsys, "train", "--resume", tmp_path / "run", "--iters", 3)
    assert rc == 0 and "done: 1 steps" in out and "3 in all" in out, err
    assert json.load(open(tmp_path / "run" / "config.json"))["iters"] == 3
    rc, out, err = main_in_process(capsys, "train", "--resume", tmp_path / "run")
    assert_clean_error(rc, err, f"--resume {tmp_path / 'run'}: the run is finished (step 3): pass --iters N over 3")
    rc, _, err = main_in_process(capsys, "train", "--resume", tmp_path / "run", "--iters", 1)
    assert_clean_error(rc, err, "the run is at step 3; --iters 1 would go back")
    assert len(open(tmp_path / "run" / "log.jsonl").readlines()) == 3


def test_resume_drops_a_torn_log_line_and_a_killed_save(tmp_path, colour_clip, tiny_ckpt):
    kw = dict(tgt="red photo", ckpt=tiny_ckpt, layers="all", clip=colour_clip, progress=False, save_every=2)
    run = nada.train(out=str(tmp_path / "r"), iters=2, **kw)
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write('{"iter": 2, "lo')                        # a kill in the middle of a write
    for leftover in (os.path.join(run, ".tmp-x1.pt"), os.path.join(run, "samples", ".tmp-x2.png")):
        open(leftover, "wb").close()
    nada.train(out=None, iters=3, resume=run, **kw)
    assert [json.loads(ln)["iter"] for ln in open(os.path.join(run, "log.jsonl"))] == [0, 1, 2]
    assert not [n for d in (run, os.path.join(run, "samples")) for n in os.listdir(d) if n.startswith(".tmp-")]


def test_resume_with_a_garbage_state_is_a_clear_error(tmp_path, capsys, colour_clip, tiny_ckpt):
    run = nada.train(tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / "r"), iters=1, layers="all",
                     clip=colour_clip, progress=False)
    open(os.path.join(run, "state.pt"), "wb").write(b"garbage" * 100)
    rc, _, err = main_in_process(capsys, "train", "--resume", run, "--iters", 2)
    assert_clean_error(rc, err, "state.pt is unreadable")


def test_two_processes_cannot_share_a_run_folder(tmp_path, colour_clip, tiny_ckpt):
    run = tmp_path / "r"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); "
                               "print('locked', flush=True); time.sleep(60)", str(run / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(nada.NadaError, match=rf"in use by another nada process \(pid {holder.pid}\)"):
            nada.train(tgt="red photo", ckpt=tiny_ckpt, out=str(run), iters=1, clip=colour_clip, progress=False)
        assert sorted(os.listdir(run)) == [".lock"]        # nothing of ours was written, and the folder stays
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        nada.atomic_write_text(str(tmp_path / "a.txt"), "x")
        nada.save_image(torch.zeros(1, 3, 4, 4), str(tmp_path / "a.png"))
    finally:
        os.umask(old)
    assert all(os.stat(tmp_path / f).st_mode & 0o777 == mode for f in ("a.txt", "a.png"))


def test_sigterm_saves_and_resume_finishes(tmp_path, colour_clip, tiny_ckpt):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "nada.py"), "train", "--ckpt", tiny_ckpt, "--clip",
                          colour_clip, "--tgt", "red photo", "--iters", "100000", "--layers", "all", "--out", str(out),
                          "--save-every", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (
            (out / "log.jsonl").exists() and len(open(out / "log.jsonl").readlines()) >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "interrupted: saved at step" in stdout
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    rc, _, err = run_cli("train", "--resume", out, "--iters", step + 1)
    assert rc == 0, err


def test_sample_grid_shows_the_first_seeds(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setattr(nada, "GRID_MAX", 2)
    out = nada.sample(ckpt=tiny_ckpt, n=3, out=str(tmp_path / "s"))
    from PIL import Image
    assert sorted(os.listdir(out)) == ["grid.png", "seed0000.png", "seed0001.png", "seed0002.png"]
    assert Image.open(os.path.join(out, "grid.png")).size == (2 * 32, 32)


# ---- command line ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--res", "abc"), ("--batch", "1,x"), ("--gen-res", "big"), ("--eval-n", "1"),
                                        ("--eval-clip", "ViT-X")])
def test_bench_refuses_bad_numbers_in_one_line(tmp_path, flag, value):
    p = subprocess.run([sys.executable, os.path.join(HERE, "ops", "bench.py"), flag, value, "--out", str(tmp_path / "b.json")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 2 and "Traceback" not in p.stderr and f"{flag}" in p.stderr, p.stderr
    assert os.listdir(tmp_path) == []


def test_train_cli_end_to_end_then_sample(tmp_path, colour_clip, tiny_ckpt):
    out = tmp_path / "run"
    rc, stdout, err = run_cli("train", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--src", "photo", "--tgt",
                              "red photo", "--iters", 40, "--layers", "all", "--out", out, "--sample-every", 20,
                              "--device", "cpu")
    assert rc == 0, err
    # the startup line, part by part: what runs, on which layers (all 12; every parameter outside the mapping)
    n_params = sum(p.numel() for k, p in tiny_generator().named_parameters() if not k.startswith("style."))
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("nada train |")]
    assert line.split(" | ") == ["nada train", "device cpu", "ops ref (cpu)", f"CLIP {colour_clip} x1",
                                 f"layers all (12 layers, {n_params / 1e6:.2f}M params)", "memory fast (on the CPU)",
                                 "32 px, 'photo' -> 'red photo'", f"out {out}"], line
    log = [json.loads(ln) for ln in open(out / "log.jsonl")]
    assert [r["iter"] for r in log] == list(range(40))
    assert {"loss", "losses", "layers", "seconds"} <= set(log[0])
    assert log[0]["loss"] == 1.0                          # step 0: the generators agree, the direction is 0
    assert np.mean([r["loss"] for r in log[-10:]]) < 0.6
    assert sorted(os.listdir(out / "samples")) == ["000000.png", "000020.png", "000040.png"]
    from PIL import Image
    assert Image.open(out / "samples" / "000040.png").size == (4 * 32, 2 * 32)   # frozen row above adapted row
    meta = torch.load(out / "generator.pt", weights_only=True)["nada"]
    assert (meta["src"], meta["tgt"], meta["iterations"], meta["base"]) == ("photo", "red photo", 40, tiny_ckpt)
    assert json.load(open(out / "config.json"))["iters"] == 40
    rc, stdout, err = run_cli("sample", "--ckpt", out / "generator.pt", "--seeds", "0-3", "--compare", "--out", tmp_path / "s")
    assert rc == 0, err
    pair = np.asarray(Image.open(tmp_path / "s" / "seed0001.png")).astype(float)
    base, adapted = pair[:, :32], pair[:, 32:]            # base | adapted: the adapted one is the redder
    red = lambda a: (a[..., 0] - a[..., 1:].mean(-1)).mean()
    assert red(adapted) > red(base) + 5


@pytest.mark.parametrize("extra,words", [
    pytest.param(["--src", "", "--tgt", "x"], "non-empty", id="empty-src"),
    pytest.param(["--src", "Photo", "--tgt", "photo"], "the same", id="same-prompts"),
    pytest.param(["--clip", "ViT-Z/99"], "unknown CLIP model", id="clip-name"),
    pytest.param(["--clip-weights", "1,2"], "2 values for 1 CLIP models", id="clip-weights"),
    pytest.param(["--ckpt", "nope.pt"], "neither a file nor a known model", id="ckpt-missing"),
    pytest.param(["--ckpt", "{clip}"], "no generator found", id="ckpt-not-a-generator"),
    pytest.param(["--class", "cat"], "unconditional", id="class-unconditional"),
    pytest.param(["--out", "/proc/nada_cannot_write"], "cannot write the output folder", id="out-unwritable"),
    pytest.param(["--layers", "last:0"], "--layers", id="layers"),
    pytest.param(["--tgt-img", "missing.png"], "no such file", id="tgt-img-missing"),
    pytest.param(["--sample-every", "0"], ("--sample-every 0: must be", "at least 1"), id="sample-every"),
    pytest.param(["--mixing", "1.5"], ("--mixing 1.5: must be", "between 0 and 1"), id="mixing"),
])
def test_train_bad_input(tmp_path, colour_clip, tiny_ckpt, extra, words):
    """One clean error line, before anything is written (relative paths are in tmp_path, the working folder)."""
    rc, _, err = run_cli(*train_args(tmp_path, colour_clip, tiny_ckpt), *[a.format(clip=colour_clip) for a in extra],
                         cwd=tmp_path)
    assert_clean_error(rc, err, *(words if isinstance(words, tuple) else [words]))
    assert os.listdir(tmp_path) == []


COND, PLAIN = os.path.join(FIXTURES, "nvidia_32_cond.pkl"), os.path.join(FIXTURES, "nvidia_32.pkl")


@pytest.mark.parametrize("args,words", [
    pytest.param([], "runs/*/generator.pt", id="no-ckpt-no-runs"),
    pytest.param(["--ckpt", PLAIN, "--class", "cat"], "unconditional", id="class-unconditional"),
    pytest.param(["--ckpt", COND, "--class", "dragon"], "unknown class", id="class-unknown"),
    pytest.param(["--ckpt", COND], "class-conditional", id="class-missing"),
    pytest.param(["--ckpt", PLAIN, "--seeds", "9-1"], "--seeds", id="seeds"),
])
def test_sample_bad_input(tmp_path, args, words):
    assert_clean_error(*run_cli("sample", *args, cwd=tmp_path)[::2], words)
    assert os.listdir(tmp_path) == []


# ---- reliability, round three: containers, images, values, JSON, prompts, environment, disk, folders ---------

def _zip_with(src, path, replace=None, extra=(), compress=None):
    """A copy of the zip `src` at `path`: records replaced ({name: bytes}), extra (name, bytes) records appended,
    `compress`: the records written deflated."""
    with zipfile.ZipFile(src) as zin, warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # zipfile warns about a duplicate name: that is the point
        with zipfile.ZipFile(path, "w", compress or zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                zout.writestr(info.filename, (replace or {}).get(info.filename, zin.read(info)))
            for name, data in extra:
                zout.writestr(name, data)
    return path


def _container_cases(folder, clip_archive):
    """name -> (kind, path): zip and stream containers made to exhaust or mislead a loader."""
    ros = os.path.join(FIXTURES, "rosinality_32.pt")
    names = zipfile.ZipFile(ros).namelist()
    record = [n for n in names if "/data/" in n][0]
    root = names[0].split("/")[0]
    bomb = bytes(300 << 20)                                   # 300 MB of zeros: deflates to about 300 kB
    code = [n for n in zipfile.ZipFile(clip_archive).namelist() if "/code/" in n and n.endswith(".py")][0]
    legacy = folder / "legacy.pt"
    torch.save({"g_ema": {"style.1.weight": torch.zeros(2, 2)}}, legacy, _use_new_zipfile_serialization=False)
    (folder / "polyglot.pt").write_bytes(legacy.read_bytes() + open(ros, "rb").read())
    padding = [(f"{root}/data/pad", os.urandom(2 << 20))] + [(f"{root}/data/z{i}", bytes(1900 << 10)) for i in range(20)]
    for kind, method in (("bzip2", zipfile.ZIP_BZIP2), ("deflate", zipfile.ZIP_DEFLATED), ("lzma", zipfile.ZIP_LZMA)):
        buf = io.BytesIO()                                # a record that declares 100 bytes and inflates to 300 MB
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(zipfile.ZipInfo("archive/data.pkl"), bytes(300 << 20), compress_type=method)
        data = bytearray(buf.getvalue())
        struct.pack_into("<I", data, data.find(b"PK\x03\x04") + 22, 100)
        struct.pack_into("<I", data, data.find(b"PK\x01\x02") + 24, 100)
        (folder / f"lying_{kind}.pt").write_bytes(bytes(data))
    dag = "a"
    for _ in range(40):                                   # 2^40 keys as text, in a list of shared references
        dag = [dag, dag]
    (folder / "legacy_dag_keys.pt").write_bytes(b"".join(pickle.dumps(v, 2) for v in (
        0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, None, [dag])))
    torch.save({"g_ema": {k * (2 ** 61 - 1): 0 for k in range(3000)}}, folder / "hash_flood.pt")   # one hash
    (folder / "resolution.pkl").write_bytes(_dumps({"G_ema": _persistent(
        "Generator", {"synthesis": _persistent("S"), "mapping": _persistent("M")}, img_resolution=2 ** 40000,
        c_dim=0, w_dim=8)}))
    return {**{f"lying_{k}.pt": ("gen", folder / f"lying_{k}.pt") for k in ("bzip2", "deflate", "lzma")},
            **{n: ("gen", folder / n) for n in ("legacy_dag_keys.pt", "hash_flood.pt", "resolution.pkl")},
            "deflate_bomb.pt": ("gen", _zip_with(ros, folder / "deflate_bomb.pt", {record: bomb},
                                                 compress=zipfile.ZIP_DEFLATED)),
            "code_bomb_clip.pt": ("clip", _zip_with(clip_archive, folder / "code_bomb_clip.pt", {code: bomb},
                                                    compress=zipfile.ZIP_DEFLATED)),
            "many_records.pt": ("gen", _zip_with(ros, folder / "many_records.pt", extra=padding,
                                                 compress=zipfile.ZIP_DEFLATED)),
            "duplicate_names.pt": ("gen", _zip_with(ros, folder / "duplicate_names.pt",
                                                    extra=[(f"{root}/data.pkl", b"\x80\x02}q\x00.")])),
            "polyglot.pt": ("gen", folder / "polyglot.pt"),
            "state_hash_bomb.pt": ("state", _zip_with(ros, folder / "state_hash_bomb.pt", {f"{root}/data.pkl": (
                b"\x80\x02}()q\x00" + b"".join(b"h%ch%c\x86q%c" % (i, i, i + 1) for i in range(60)) + b"Nu.")})),
            "state_deep.pt": ("state", _zip_with(ros, folder / "state_deep.pt", {f"{root}/data.pkl": (
                b"\x80\x02" + b"]" * 50_000 + b"a" * 49_999 + b".")})),
            "state_deflate_bomb.pt": ("state", _zip_with(ros, folder / "state_deflate_bomb.pt", {record: bomb},
                                                         compress=zipfile.ZIP_DEFLATED))}


CONTAINERS = {  # file -> words of its one clean error"lying_bzip2.pt": "compressed", "lying_deflate.pt": "compressed", "lying_lzma.pt": "compressed",
              "legacy_dag_keys.pt": "storages", "hash_flood.pt": "large number", "resolution.pkl": "img_resolution",
              "deflate_bomb.pt": "inflate", "code_bomb_clip.pt": "inflate", "many_records.pt": "inflate",
              "duplicate_names.pt": "repeat a name", "polyglot.pt": "two formats", "state_hash_bomb.pt": "dictionary key",
              "state_deep.pt": "deeper than", "state_deflate_bomb.pt": "inflate"}


@pytest.fixture(scope="module")
def container_results(tmp_path_factory):
    import clip
    folder = tmp_path_factory.mktemp("containers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_tiny_clip(1, 32), (torch.randn(1, 3, 32, 32), clip.tokenize(["x"]))).save(folder / "c.pt")
    cases = _container_cases(folder, folder / "c.pt")
    results = _load_all(list(cases.values()), folder)
    return {name: results[str(path)] for name, (_, path) in cases.items()}


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_containers_are_checked_before_anything_inflates(container_results, name):
    """Compression bombs, records that add up to gigabytes, a name twice, a stream with a zip appended, and a run's
    state.pt made to hang: each one clean error, fast and within the memory cap, before anything is inflated."""
    r = container_results[name]
    assert r["outcome"] == "error", r
    _assert_clean(r, CONTAINERS[name])


def _png(path, width, height):
    """A tiny PNG that declares width x height (one grey row, repeated by the filter: kilobytes for any size)."""
    import zlib as z
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", z.crc32(kind + data))
    rows = z.compress(b"".join(b"\x00" + b"\x80" * width * 3 if i == 0 else b"\x02" + bytes(width * 3)
                               for i in range(min(height, 4))), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_image_bombs_are_refused_before_decoding_and_large_images_are_reduced(tmp_path):
    from PIL import Image
    bomb = _png(tmp_path / "bomb.png", 9000, 9000)
    t = time.time()
    with pytest.raises(nada.NadaError, match=r"bomb\.png: 9000x9000 pixels, more than"):
        nada.load_image(str(bomb))
    assert time.time() - t < 2 and bomb.stat().st_size < 100_000
    Image.new("RGB", (4000, 3000), (200, 30, 40)).save(tmp_path / "big.jpg", quality=90)
    img = nada.load_image(str(tmp_path / "big.jpg"))
    assert img.shape == (1, 3, 448, 597)                      # short side 448: what CLIP reads, twice over
    assert img[0, 0].mean() > 0.5 and img[0, 2].mean() < -0.5   # the colour survived the reduction
    Image.new("RGB", (40, 48), (250, 10, 10)).save(tmp_path / "small.png")
    assert nada.load_image(str(tmp_path / "small.png")).shape == (1, 3, 48, 40)   # small images are not enlarged


@pytest.mark.parametrize("where", ["fifo", "folder"])
def test_only_regular_files_are_read(tmp_path, where):
    path = tmp_path / "p"
    os.mkfifo(path) if where == "fifo" else path.mkdir()
    t = time.time()
    with pytest.raises(nada.NadaError, match="not a regular file"):
        nada.load_image(str(path))
    with pytest.raises(nada.NadaError):
        nada.read_clip_weights(str(path))
    assert nada.read_json(str(path)) == {} and time.time() - t < 5


def _checkpoint_with(path, config=None, meta=None, **tensors):
    good = torch.load(os.path.join(FIXTURES, "rosinality_32.pt"), weights_only=False)
    torch.save({"g_ema": dict(good["g_ema"], **tensors), "latent_avg": good["latent_avg"],
                "nada": dict({"format": 1}, **(meta or {}))}, path)
    return path


@pytest.mark.parametrize("case,words", [
    ("zero_channels", "dimensions"), ("negative_z_dim", "dimensions"), ("nan_weight", "NaN or infinity"),
    ("inf_weight", "NaN or infinity"), ("clip_a_number", "recorded clip"), ("iterations_a_list", "recorded iterations"),
    ("tgt_img_nested", "recorded tgt_img"),
])
def test_checkpoint_values_are_checked_at_load(tmp_path, capsys, case, words):
    good = torch.load(os.path.join(FIXTURES, "rosinality_32.pt"), weights_only=False)["g_ema"]
    w = good["style.1.weight"].clone()
    kw = {"zero_channels": {"tensors": {"input.input": torch.zeros(1, 0, 4, 4)}},
          "negative_z_dim": {"tensors": {"embed.weight": torch.zeros(128, 10), "embed.bias": torch.zeros(128)}},
          "nan_weight": {"tensors": {"style.1.weight": w.index_fill(0, torch.tensor([3]), float("nan"))}},
          "inf_weight": {"tensors": {"convs.0.conv.weight": good["convs.0.conv.weight"] * float("inf")}},
          "clip_a_number": {"meta": {"clip": 5}}, "iterations_a_list": {"meta": {"iterations": [[[1]]]}},
          "tgt_img_nested": {"meta": {"tgt_img": [["a.png"]]}}}[case]
    path = _checkpoint_with(tmp_path / f"{case}.pt", meta=kw.get("meta"), **kw.get("tensors", {}))
    rc, _, err = main_in_process(capsys, "sample", "--ckpt", path, "--n", 1, "--out", tmp_path / "s")
    assert_clean_error(rc, err, f"{case}.pt", words)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("damage,words", [
    ('{"src": 5}', "config.json is unreadable"), ('{"iters": 1e12}', "config.json is unreadable"),
    ('{"batch": 2.5}', "config.json is unreadable"), ("[" * 100_000 + "]" * 100_000, "config.json is unreadable"),
    ('{"clip_weights": [[1]]}', "config.json is unreadable"),
])
def test_a_run_folders_json_files_are_typed_when_read(tmp_path, capsys, colour_clip, tiny_ckpt, damage, words):
    run = nada.train(tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / "r"), iters=1, layers="all",
                     clip=colour_clip, progress=False)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    changed = json.loads(damage) if damage.startswith("{") else None
    (tmp_path / "r" / "config.json").write_text(json.dumps({**cfg, **changed}) if changed else damage)
    rc, _, err = main_in_process(capsys, "train", "--resume", run, "--iters", 2)
    assert_clean_error(rc, err, words)
    with open(tmp_path / "r" / "log.jsonl", "a") as f:       # a deep or mistyped log line is skipped, not fatal
        f.write("[" * 100_000 + "]" * 100_000 + "\n" + '{"iter": [1], "loss": 1, "seconds": 1}\n')
    assert [r["iter"] for r in nada.read_log(tmp_path / "r")] == [0]
    (tmp_path / "r" / "eval.json").write_text(json.dumps({**{k: "x" for k in nada.METRICS}, "per_clip": {}}))
    assert nada.read_eval(str(tmp_path / "r" / "eval.json")) == {}


def test_a_damaged_weights_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "ffhq.pkl").write_bytes(b"x")
    (tmp_path / "w" / "manifest.json").write_text(json.dumps({"ffhq.pkl": {"url": "u"}}))   # no size
    with pytest.raises(nada.NadaError, match="manifest.json: its entry for ffhq.pkl is damaged"):
        nada.resolve_ckpt("ffhq", str(tmp_path / "w"))


def test_a_huge_prompt_is_refused_before_tokenizing(tmp_path, capsys, colour_clip, tiny_ckpt):
    t = time.time()
    rc, _, err = main_in_process(capsys, "train", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--tgt", "a" * 100_000,
                                 "--iters", 1, "--out", tmp_path / "r")
    assert_clean_error(rc, err, "does not fit CLIP's 77 tokens")
    assert time.time() - t < 20 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("env,flags,words", [
    ({"WORLD_SIZE": "abc"}, [], "WORLD_SIZE='abc'"), ({"WORLD_SIZE": "2"}, [], "torchrun sets WORLD_SIZE"),
    ({"LOCAL_RANK": "-1"}, [], "LOCAL_RANK='-1'"), ({"NADA_MIRROR": "not a url"}, [], "NADA_MIRROR"),
    ({}, ["--clip-weights", "nan"], "each weight must be a positive number"),
    ({}, ["--clip-weights", "-1"], "each weight must be a positive number"),
    ({}, ["--clip-weights", "0"], "each weight must be a positive number"),
])
def test_environment_and_flags_are_checked_before_anything_loads(tmp_path, env, flags, words):
    rc, _, err = run_cli("train", "--ckpt", "ffhq", "--weights-dir", tmp_path / "w", "--offline", "--out",
                         tmp_path / "r", *flags, env=env)
    assert_clean_error(rc, err, words)
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()


def test_a_full_disk_during_a_save_is_one_message_and_the_run_stays_consistent(tmp_path, colour_clip, tiny_ckpt,
                                                                              monkeypatch):
    real, calls = torch.save, []

    def full_at_the_third(obj, f, *a, **k):                   # saves 1-2 (step 2) pass, 3-4 (step 4) fail at the 4th
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_at_the_third)
    with pytest.raises(nada.NadaError, match=r"the disk is full: .*state\.pt could not be written"):
        nada.train(tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / "r"), iters=4, layers="all",
                   clip=colour_clip, progress=False, save_every=2, sample_every=100)
    monkeypatch.undo()
    generator = torch.load(tmp_path / "r" / "generator.pt", weights_only=True)["nada"]["iterations"]
    assert generator == torch.load(tmp_path / "r" / "state.pt", weights_only=True)["step"] == 2
    assert not [n for n in os.listdir(tmp_path / "r") if n.startswith(".tmp-")]
    nada.train(resume=str(tmp_path / "r"), clip=colour_clip, progress=False)       # and it resumes
    assert torch.load(tmp_path / "r" / "state.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("owner", ["study", "run"])
def test_sample_never_writes_into_a_run_or_study_folder(tmp_path, capsys, tiny_ckpt, owner):
    folder = tmp_path / owner
    folder.mkdir()
    (folder / ("results.json" if owner == "study" else "config.json")).write_text("{}")
    (folder / "grid.png").write_bytes(b"the study's")
    rc, _, err = main_in_process(capsys, "sample", "--ckpt", tiny_ckpt, "--n", 1, "--out", folder)
    assert_clean_error(rc, err, "a run's or a study's folder")
    assert (folder / "grid.png").read_bytes() == b"the study's"


# ---- settings records: one declaration per flag ---------------------------------------------------------------

def test_every_setting_is_a_flag_with_its_default_and_the_cli_types_it():
    parser = nada.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for cmd, record in nada.COMMANDS.items():
        flags = {a.dest: a for a in commands[cmd]._actions if a.dest != "help"}
        fields = {f.name: f for f in dataclasses.fields(record) if f.metadata["help"] and f.name not in record.hidden}
        assert set(flags) == set(fields), cmd
        for name, f in fields.items():
            own = record.helps.get(name, f.metadata["help"])
            if f.default is not None and f.default is not False and "default" not in own:   # 0 is shown too
                assert f"(default: {f.default})" in flags[name].help, (cmd, name)
    args = vars(parser.parse_args(["train", "--iters", "7", "--class", "bird", "--tgt-img", "a.png", "b.png"]))
    assert args == {"cmd": "train", "iters": 7, "cls": "bird", "tgt_img": ["a.png", "b.png"]}   # only what was typed
    assert "--sample-every" not in commands["study"].format_help() and "--eval-clip" in commands["study"].format_help()


def test_a_resumed_run_keeps_its_recorded_steps_settings(tmp_path, capsys, colour_clip, tiny_ckpt):
    """--save-every, --sample-every and --n-sample are recorded: a continuation keeps them unless they are typed."""
    rc, _, err = main_in_process(capsys, *train_args(tmp_path, colour_clip, tiny_ckpt), "--tgt", "red photo",
                                 "--save-every", 1, "--sample-every", 1, "--n-sample", 2)
    assert rc == 0, err
    rc, _, err = main_in_process(capsys, "train", "--resume", tmp_path / "ok", "--iters", 3)
    assert rc == 0, err
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert (cfg["save_every"], cfg["sample_every"], cfg["n_sample"], cfg["iters"]) == (1, 1, 2, 3)
    assert sorted(os.listdir(tmp_path / "ok" / "samples")) == [f"{i:06d}.png" for i in range(4)]
    settings = nada.TrainSettings(tgt="red photo", ckpt=tiny_ckpt, clip=colour_clip, iters=1, progress=False,
                                  out=str(tmp_path / "rec"))
    assert nada.train(**vars(settings)) == str(tmp_path / "rec")   # a record passes as keywords


def test_a_pickle_cannot_change_the_stand_ins_that_serve_the_next_file():
    """BUILD on a global a pickle names (a function shared by every load) is refused: it would outlive the file."""
    hostile = b"\x80\x02cbuiltins\nset\nN}X\x0c\x00\x00\x00__defaults__]X\x04\x00\x00\x00evilq\x00a\x85s\x86b0}."
    with pytest.raises(nada._Refused, match="sets the state of a class or function"):
        nada._unpickle(nada._PickleFile(io.BytesIO(hostile)), nada._torch_globals(nvidia=True))
    assert nada._set() == set() and nada._ordered_dict.__defaults__ == ((),)


def test_clip_files_after_a_comma_are_made_absolute_too(tmp_path, monkeypatch, colour_clip):
    monkeypatch.chdir(tmp_path)
    shutil.copy(colour_clip, tmp_path / "b.pt")
    s = nada.train_settings(tgt="red photo", clip=f"{colour_clip}, b.pt")
    assert s.clip == f"{colour_clip},{tmp_path / 'b.pt'}"


def test_inputs_that_cannot_be_used_are_refused_before_any_download(tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    offline = ["--weights-dir", tmp_path / "w", "--offline"]
    rc, _, err = main_in_process(capsys, "train", "--ckpt", "ffhq", "--tgt-img", tmp_path / "bad.png", *offline)
    assert_clean_error(rc, err, "bad.png: not a readable image")
    rc, _, err = main_in_process(capsys, "sample", "--ckpt", "ffhq", "--out", tmp_path / "run", *offline)
    assert_clean_error(rc, err, "a run's or a study's folder")
    assert not (tmp_path / "w").exists()


def test_a_save_renames_state_pt_last(tmp_path, colour_clip, tiny_ckpt, monkeypatch):
    """A kill between the two renames must leave state.pt behind generator.pt (--resume redoes those steps), never
    ahead of it (a finished state with a stale generator would never be written again)."""
    renamed, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(os.path.basename(b)), real(a, b))[1])
    nada.train(tgt="red photo", ckpt=tiny_ckpt, out=str(tmp_path / "r"), iters=1, layers="all", clip=colour_clip,
               progress=False, sample_every=100)
    saves = [n for n in renamed if n.endswith(".pt")]
    assert saves == ["generator.pt", "state.pt"]


@pytest.mark.parametrize("text", ["CUDA error: out of memory", "cuDNN error: CUDNN_STATUS_ALLOC_FAILED out of memory"])
def test_every_out_of_memory_is_one_clear_error(tmp_path, capsys, colour_clip, tiny_ckpt, monkeypatch, text):
    monkeypatch.setattr(nada, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(text)))
    rc, _, err = main_in_process(capsys, "train", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--tgt", "red photo",
                                 "--out", tmp_path / "run")
    assert_clean_error(rc, err, "out of memory", "lower --batch")


@pytest.mark.parametrize("policy, says", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE"),
                                          ("default", "as it likes (spinning, then sleeping)")])
def test_the_cli_lets_openmp_threads_sleep_unless_told_otherwise(policy, says):
    """Two jobs on one CPU: spinning OpenMP threads slowed each 4-6x here, so nada.py's CLI sets OMP_WAIT_POLICY=PASSIVE
    before torch loads, unless the user set it ("default": OpenMP's own, the variable unset); `doctor` says which."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": policy} if policy else {})
    p = subprocess.run([sys.executable, os.path.join(HERE, "nada.py"), "doctor", "--device", "cpu"], env=env, text=True,
                       capture_output=True, timeout=300)
    assert f"OpenMP waits {says}\n" in p.stdout and "libgomp" not in p.stderr, p.stdout + p.stderr


def test_prompts_that_look_the_same_to_clip_are_refused_before_training(tmp_path, colour_clip, tiny_ckpt):
    """CLIP's tokenizer folds runs of spaces: the prompts give one embedding, and a run would train at a constant loss."""
    rc, _, err = run_cli(*train_args(tmp_path, colour_clip, tiny_ckpt), "--src", "a  photo", "--tgt", "a photo")
    assert_clean_error(rc, err, "'a  photo' and 'a photo' look the same to this CLIP model (their text direction has length "
                       "0.0e+00): choose prompts that differ")
    assert not (tmp_path / "ok").exists()


def test_memory_auto_estimates_from_the_loaded_base_without_reading_its_file_again(monkeypatch, tiny_ckpt,
                                                                                   colour_clip):
    G = nada.load_generator(tiny_ckpt)
    s = nada.train_settings(ckpt=tiny_ckpt, clip=colour_clip, src="photo", tgt="red photo", device="cuda")
    fast = dataclasses.replace(s, memory="fast")
    from_file = nada.dry_run(fast)["peak_bytes"]
    reads = []
    monkeypatch.setattr(nada, "load_generator", lambda *a, **k: reads.append(a))
    mode, why = nada.choose_memory(s, "cuda", G)
    assert reads == [] and mode == "fast" and why == f"needs {(from_file + nada.CUDA_CONTEXT) / 2 ** 30:.1f} GiB; " \
                                                      "no GPU here to compare"
    assert nada.dry_run(fast, G)["peak_bytes"] == from_file
    need = from_file + nada.CUDA_CONTEXT                  # on a GPU, the base and the context are held already
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 << 20)
    for free, mode in ((need - nada.CUDA_CONTEXT - (10 << 20), "fast"), (need - nada.CUDA_CONTEXT - (10 << 20) - 1, "low")):
        monkeypatch.setattr(nada, "free_gpu_bytes", lambda device: free)
        assert nada.choose_memory(s, "cuda", G)[0] == mode


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_the_dry_run_counts_bf16_activations_as_autocast_makes_them(tiny_ckpt, colour_clip, memory):
    """torch.autocast does not act on meta tensors; MetaAutocast stands in (and, with --memory low, in the layers that
    backward recomputes), and its count is the real one: the same bytes (to a few scalars) as two real bf16 steps on
    the CPU, counted by the same LiveBytes; fewer than float32's with --memory fast."""
    peaks = {}
    for precision in ("fp32", "bf16"):
        s = nada.train_settings(ckpt=tiny_ckpt, clip=colour_clip, src="photo", tgt="red photo", precision=precision,
                                layers="all", device="cpu", memory=memory)
        t = nada.prepare(s, "cpu", memory)
        real = nada.estimate_memory(t.step, [t.G_frozen, t.G, *t.models], t.opt)
        estimate = nada.dry_run(s)
        assert abs(estimate["peak_bytes"] - real["peak_bytes"]) <= 1024, precision   # a few scalars differ
        peaks[precision] = real["activation_bytes"]
    assert peaks["bf16"] < 0.95 * peaks["fp32"] or memory == "low"


def test_progress_lines_where_stdout_is_no_terminal(tmp_path, colour_clip, tiny_ckpt):
    """A log file gets a line at every tenth of the run: step, loss, rate, time left (eval likewise, in images)."""
    rc, out, err = run_cli(*train_args(tmp_path, colour_clip, tiny_ckpt), "--iters", 20)
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("train: ")]
    assert [int(re.match(r"train: (\d+)/20 steps \((\d+)%\), loss [\d.]+, [\d.e+]+ steps/s, \d+ s left$", ln).group(1))
            for ln in lines] == list(range(2, 21, 2)), out
    rc, out, err = run_cli("eval", "--ckpt", tmp_path / "ok", "--clip", colour_clip, "--n", 20, "--batch", 1)
    assert rc == 0, err
    assert [ln.split(" (")[0] for ln in out.splitlines() if ln.startswith("eval: ")] == [f"eval: {i}/20 images"
                                                                                       for i in range(2, 21, 2)], out


def test_progress_says_something_at_least_once_a_minute(monkeypatch, capsys):
    clock = iter(range(0, 10 ** 6, 61))
    monkeypatch.setattr(nada.time, "time", lambda: next(clock))
    bar = nada.Progress("study", 1000)
    for _ in range(3):
        bar.update(loss="0.5")
    assert capsys.readouterr().out.splitlines() == [
        "study: 1/1000 steps (0%), loss 0.5, 0.0164 steps/s, 16.9 h left",
        "study: 2/1000 steps (0%), loss 0.5, 0.0164 steps/s, 16.9 h left",
        "study: 3/1000 steps (0%), loss 0.5, 0.0164 steps/s, 16.9 h left"]


def test_plot_ticks_are_round_and_cover_the_data():
    assert nada.nice_ticks(0, 37) == ([0, 10, 20, 30, 40], 0)
    ticks, decimals = nada.nice_ticks(0.4321, 0.9876)
    assert [round(t, 9) for t in ticks] == [0.4, 0.6, 0.8, 1.0] and decimals == 1
    assert [round(t, 9) for t in nada.nice_ticks(0.99, 1.0)[0]] == [0.99, 0.992, 0.994, 0.996, 0.998, 1.0]
    assert nada.nice_ticks(0, 99) == ([0, 20, 40, 60, 80, 100], 0)
    ticks, _ = nada.nice_ticks(1.0, 1.0)                 # a flat curve sits inside its axis
    assert ticks[0] < 1.0 < ticks[-1]


def test_short_runs_get_whole_step_ticks():
    assert nada.nice_ticks(0, 2, least=1) == ([0, 1, 2], 0) and nada.nice_ticks(0, 3, least=1)[0] == [0, 1, 2, 3]


def test_dashed_lines_keep_their_pattern_across_vertices():
    """(9, 4): 9 px on (PIL draws both ends: 10 pixels), 4 off, every 13 px, through the vertex at x = 25."""
    from PIL import Image, ImageDraw
    img = Image.new("L", (60, 3), 0)
    nada.draw_dashed(ImageDraw.Draw(img), [(0, 1), (25, 1), (59, 1)], (9, 4), fill=255, width=1)
    assert "".join("#" if v else "." for v in np.asarray(img)[1]) == "##########..." * 4 + "########"
    img = Image.new("L", (60, 3), 0)
    nada.draw_dashed(ImageDraw.Draw(img), [(0, 1), (59, 1)], (), fill=255, width=1)
    assert np.asarray(img)[1].all()


# ---- invert and edit ----------------------------------------------------------------------------------------

NVIDIA_32 = os.path.join(FIXTURES, "nvidia_32.pkl")


def lpips_state_dict(widths=(8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 16), seed=0):
    """A random VGG16 (torchvision's names, any widths) with LPIPS's calibration names."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, o, n in zip(nada.VGG16_CONVS, widths, (3, *widths)):
        sd[f"features.{i}.weight"] = torch.randn(o, n, 3, 3, generator=g) * (2 / (9 * n)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    for k, t in enumerate(nada.LPIPS_TAPS):
        sd[f"lin{k}.model.1.weight"] = torch.rand(1, widths[t - 1], 1, 1, generator=g)
    return sd


def psnr(a, b):
    """Per image, for images in [-1, 1] (peak to peak 2)."""
    return (10 * torch.log10(4 / (a - b).square().mean((1, 2, 3)))).tolist()


def test_lpips_is_the_published_formula_on_torchvisions_layer_layout():
    """An independent LPIPS: torchvision's VGG16 feature stack as one Sequential (conv, ReLU, pool at its published
    indices), read after ReLUs 3, 8, 15, 22 and 29, each map unit-normalised over channels, the squared difference
    weighted by lin, averaged over pixels, summed."""
    sd = lpips_state_dict()
    layers = []
    for i in range(30):
        if i in nada.VGG16_CONVS:
            w = sd[f"features.{i}.weight"]
            layers.append(torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1))
            layers[-1].weight.data, layers[-1].bias.data = w, sd[f"features.{i}.bias"]
        else:
            layers.append(torch.nn.MaxPool2d(2) if i in (4, 9, 16, 23) else torch.nn.ReLU())
    vgg = torch.nn.Sequential(*layers)
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def reference(a, b):
        total = 0
        fa, fb = (a - shift) / scale, (b - shift) / scale
        for i, layer in enumerate(vgg):
            fa, fb = layer(fa), layer(fb)
            if i in (3, 8, 15, 22, 29):
                k = (3, 8, 15, 22, 29).index(i)
                na, nb = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10), fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + ((na - nb) ** 2 * sd[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
        return total

    a, b = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    lpips = nada.LPIPS(sd)
    torch.testing.assert_close(lpips(a, b), reference(a, b), rtol=1e-5, atol=1e-7)
    assert lpips(a, a).abs().max() < 1e-9 and (lpips(a, b) > 0).all()


def test_lpips_files_of_2017_are_read_as_data_and_wrong_ones_refused(tmp_path):
    """torchvision's VGG16 and LPIPS's calibration are legacy torch.save files whose OrderedDict is pickled from a
    list of [key, value] pairs; a file without LPIPS's tensors is one clear error."""
    from collections import OrderedDict

    class OldDict(OrderedDict):
        def __reduce__(self):
            return OrderedDict, ([[k, v] for k, v in self.items()],)

    sd = lpips_state_dict()
    torch.save(OldDict(sd), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert b"_rebuild_tensor_v2" in (tmp_path / "old.pth").read_bytes()[:2000]
    lpips = nada.load_lpips(str(tmp_path / "old.pth"), "cpu")
    torch.testing.assert_close(lpips.convs[3].weight, sd["features.7.weight"])
    del sd["lin4.model.1.weight"]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(nada.NadaError, match=r"--lpips .*short\.pt: not the weights of LPIPS on VGG16"):
        nada.load_lpips(str(tmp_path / "short.pt"), "cpu")
    assert nada.load_lpips("off", "cpu") is None


def test_lpips_downloads_are_named_with_the_others_when_offline(tmp_path):
    with pytest.raises(nada.NadaError) as e:
        nada.fetch_weights([], [], str(tmp_path), True, lpips=True)
    assert "vgg16-397923af.pth" in str(e.value) and "lpips/weights/v0.1/vgg.pth" in str(e.value)


def test_a_sha256_prefix_is_checked_as_torchvision_checks_it(tmp_path):
    server = _Server({"vgg16-397923af.pth": b"not vgg"})
    try:
        os.environ["NADA_MIRROR"] = server.url
        with pytest.raises(nada.NadaError, match="SHA-256 mismatch"):
            nada.download(nada.VGG16_URL, str(tmp_path / "vgg16-397923af.pth"), sha256="397923af")
        import hashlib
        good = hashlib.sha256(b"not vgg").hexdigest()
        assert nada.download(nada.VGG16_URL, str(tmp_path / "v.pth"), sha256=good[:8]) == str(tmp_path / "v.pth")
    finally:
        os.environ.pop("NADA_MIRROR")
        server.close()
    assert not os.path.exists(tmp_path / "vgg16-397923af.pth")


@pytest.mark.parametrize("lpips", ["off", "vgg"])
def test_invert_recovers_images_the_generator_rendered(lpips):
    """Images of the 32 px fixture from random latents (without its noise, which the penalty keeps the maps from
    copying) come back: about 26 dB after 300 steps (README's table), far above the mean w's image."""
    G = nada.load_generator(NVIDIA_32)
    z = torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        targets = G(z, noise_mode="none")
    r = nada.invert(G, targets, steps=300, lpips=None if lpips == "off" else nada.LPIPS(lpips_state_dict()),
                    show=False)
    with torch.no_grad():
        recon = G.synthesis(r["ws"], noise=r["noise"])
        start = G.synthesis(nada.w_spread(G, "cpu")[0].expand(3, G.num_ws, -1))
    print(psnr(recon, targets), psnr(start, targets))
    assert sum(psnr(recon, targets)) / 3 > 23 and min(psnr(recon, targets)) > max(psnr(start, targets)) + 8
    assert r["steps"] == 300 and not r["interrupted"] and r["ws"].shape == (3, G.num_ws, G.w_dim)
    assert not any(p.requires_grad is False for p in G.parameters())   # G's own flags are given back


@pytest.fixture(scope="module")
def photo_of_tiny(tmp_path_factory, tiny_ckpt):
    """A 'photo': the tiny base's image of seed 3, a PNG."""
    G = nada.load_generator(tiny_ckpt)
    path = tmp_path_factory.mktemp("photo") / "face.png"
    with torch.no_grad():
        nada.save_image(G(nada.seed_latents(G, [3])), str(path))
    return str(path)


def test_invert_cli_writes_a_plain_latent_and_its_reconstruction(tmp_path, tiny_ckpt, photo_of_tiny):
    from PIL import Image
    big = tmp_path / "wide.jpg"                                 # 96x64: centre-cropped to 64x64, then to 32 px
    Image.open(photo_of_tiny).resize((64, 64)).crop((0, 0, 64, 64)).save(tmp_path / "sq.png")
    Image.new("RGB", (96, 64), (0, 0, 255)).save(big)
    rc, out, err = run_cli("invert", "--img", photo_of_tiny, big, "--ckpt", tiny_ckpt, "--lpips", "off", "--steps",
                           40, "--batch", 2, "--out", tmp_path / "inv", "--device", "cpu")
    assert rc == 0, err
    assert "nada invert | device cpu" in out and "centre-cropped to 32 px" in out and "aligned as FFHQ's" in out
    r = torch.load(tmp_path / "inv" / "face.latent.pt", weights_only=True)
    assert r["ws"].shape == (8, 32) and r["ws"].dtype == torch.float32 and r["steps"] == 40
    assert r["base"] == tiny_ckpt and r["image_sha256"] == nada.sha256_of(photo_of_tiny)
    assert [n.shape for n in r["noise"]] == [b.shape[1:] for b in nada.load_generator(tiny_ckpt).noises.buffers()]
    recon = nada.load_image(str(tmp_path / "inv" / "wide.recon.png"))
    assert recon.shape == (1, 3, 32, 32) and os.path.isfile(tmp_path / "inv" / "face.recon.png")
    assert sorted(os.listdir(tmp_path / "inv")) == ["face.latent.pt", "face.recon.png", "wide.latent.pt",
                                                     "wide.recon.png"]


def test_load_photo_crops_the_centre_and_scales_to_the_generator(tmp_path):
    from PIL import Image
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))                  # the centre square is blue, the sides red
    img.save(tmp_path / "p.png")
    x = nada.load_photo(str(tmp_path / "p.png"), 32)
    assert x.shape == (1, 3, 32, 32) and x[0, 2].min() > 0.9 and x[0, 0].max() < -0.9


@pytest.mark.parametrize("bad", ["text", "truncated", "bomb", "folder", "fifo", "missing"])
def test_invert_refuses_what_is_no_photo_and_writes_nothing(tmp_path, tiny_ckpt, photo_of_tiny, bad):
    path = tmp_path / f"x_{bad}.png"
    if bad == "text":
        path.write_text("hello")
    elif bad == "truncated":
        path.write_bytes(open(photo_of_tiny, "rb").read()[:200])
    elif bad == "bomb":
        _png(path, 30000, 30000)
    elif bad == "folder":
        path.mkdir()
    elif bad == "fifo":
        os.mkfifo(path)
    rc, _, err = run_cli("invert", "--img", photo_of_tiny, path, "--ckpt", tiny_ckpt, "--lpips", "off", "--out",
                         tmp_path / "inv", timeout=60)
    assert_clean_error(rc, err, str(path))
    assert not os.path.exists(tmp_path / "inv")


def test_invert_stops_on_ctrl_c_with_the_best_latent_so_far(tmp_path, tiny_ckpt, photo_of_tiny):
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "nada.py"), "invert", "--img", photo_of_tiny, "--ckpt",
                          tiny_ckpt, "--lpips", "off", "--steps", "100000", "--out", tmp_path / "inv", "--device",
                          "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while "nada invert |" not in line:                        # the startup line: the steps begin right after it
        line = p.stdout.readline()
        assert line, p.stderr.read()
    time.sleep(3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted at step" in out and "Traceback" not in err
    r = torch.load(tmp_path / "inv" / "face.latent.pt", weights_only=True)
    assert 0 < r["steps"] < 100000 and math.isfinite(r["loss"])


def test_edit_renders_the_photo_in_each_domain_and_reuses_its_latent(tmp_path, red_and_blue_runs, photo_of_tiny):
    """The red run's edit is redder than the reconstruction, the blue run's bluer, and the picture is kept: the edit's
    brightness pattern correlates with the reconstruction's. A second edit reuses face.latent.pt."""
    runs, out = [red_and_blue_runs["red"], red_and_blue_runs["blue"]], tmp_path / "inv"
    rc, stdout, err = run_cli("edit", "--img", photo_of_tiny, "--ckpt", *runs, "--lpips", "off", "--steps", 200,
                              "--out", out, "--device", "cpu")
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["face.blue.png", "face.edit.png", "face.latent.pt", "face.recon.png",
                                       "face.red.png"]
    recon, red, blue = (nada.load_image(str(out / f"face.{n}.png")) for n in ("recon", "red", "blue"))
    photo = nada.load_image(photo_of_tiny)
    print(psnr(recon, photo), redness(red, 0) - redness(recon, 0), redness(blue, 2) - redness(recon, 2))
    assert psnr(recon, photo)[0] > 20
    assert redness(red, 0) > redness(recon, 0) + 0.1 and redness(blue, 2) > redness(recon, 2) + 0.1
    grey = lambda x: (x.mean(1) - x.mean()).flatten()
    for edited in (red, blue):
        assert torch.corrcoef(torch.stack([grey(recon), grey(edited)]))[0, 1] > 0.5
    sheet = nada.load_image(str(out / "face.edit.png"), short=10_000)
    assert sheet.shape[3] == 4 * 128 and sheet.shape[2] > 128          # input | reconstruction | red | blue
    latent = (out / "face.latent.pt").stat().st_mtime_ns
    rc, stdout, err = run_cli("edit", "--img", photo_of_tiny, "--ckpt", runs[0], "--lpips", "off", "--steps", 150,
                              "--out", out, "--offline", "--weights-dir", tmp_path / "none")   # no LPIPS wanted
    assert rc == 0 and "reusing" in stdout and (out / "face.latent.pt").stat().st_mtime_ns == latent, err
    rc, stdout, err = run_cli("edit", "--latents", out / "face.latent.pt", "--ckpt", runs[1], "--out", tmp_path / "l")
    assert rc == 0, err
    torch.testing.assert_close(nada.load_image(str(tmp_path / "l" / "face.blue.png")), blue)
    rc, stdout, err = run_cli("edit", "--img", photo_of_tiny, "--ckpt", runs[0], "--lpips", "off", "--steps", 201,
                              "--out", tmp_path / "inv")            # more steps than the saved latent had: again
    assert rc == 0 and "reusing" not in stdout and (out / "face.latent.pt").stat().st_mtime_ns != latent, err
    assert torch.load(out / "face.latent.pt", weights_only=True)["steps"] == 201


def test_edit_refuses_runs_of_other_bases_and_latents_of_other_shapes(tmp_path, red_and_blue_runs, photo_of_tiny):
    other = tmp_path / "other.pt"
    nada.save_generator(tiny_generator(seed=1), other, base=NVIDIA_32)
    rc, _, err = run_cli("edit", "--img", photo_of_tiny, "--ckpt", red_and_blue_runs["red"], other, "--out", tmp_path)
    assert_clean_error(rc, err, "different bases")
    G = nada.load_generator(NVIDIA_32)
    torch.save(dict(ws=torch.zeros(G.num_ws, G.w_dim), noise=[b[0] for b in G.noises.buffers()]), tmp_path / "n.pt")
    rc, _, err = run_cli("edit", "--latents", tmp_path / "n.pt", "--ckpt", red_and_blue_runs["red"], "--out",
                         tmp_path / "o")
    assert_clean_error(rc, err, "n.pt: a latent of a generator with 8 x 64 ws, but this base has 8 x 32")
    assert not os.path.exists(tmp_path / "o")
    rc, _, err = run_cli("edit", "--ckpt", red_and_blue_runs["red"])
    assert_clean_error(rc, err, "--img PHOTO")
    rc, _, err = run_cli("edit", "--img", photo_of_tiny, "--ckpt", red_and_blue_runs["red"], "--out",
                         red_and_blue_runs["blue"])
    assert_clean_error(rc, err, "is a run's or a study's folder")
    twin = tmp_path / "twin.pt"                                 # the base's architecture, other weights
    nada.save_generator(tiny_generator(seed=1), twin)
    rc, _, err = run_cli("invert", "--img", photo_of_tiny, "--ckpt", twin, "--lpips", "off", "--steps", 2, "--out",
                         tmp_path / "t")
    assert rc == 0, err
    rc, _, err = run_cli("edit", "--latents", tmp_path / "t" / "face.latent.pt", "--ckpt", red_and_blue_runs["red"],
                         "--out", tmp_path / "o")
    assert_clean_error(rc, err, "face.latent.pt: a latent found in", "twin.pt, not in this base")
    shutil.copy(os.path.join(red_and_blue_runs["red"], "generator.pt"), tmp_path / "recon.pt")
    rc, _, err = run_cli("edit", "--img", photo_of_tiny, "--ckpt", tmp_path / "recon.pt", "--out", tmp_path / "o")
    assert_clean_error(rc, err, "a run is named recon")
    assert not os.path.exists(tmp_path / "o")


def test_pivotal_tuning_matches_the_photo_closer_and_keeps_the_domain(tmp_path, red_and_blue_runs, tiny_ckpt):
    """A photo the base cannot render exactly (its image of seed 3 with a bright square): pivotal tuning brings the
    reconstruction closer, and the red run's change on the tuned base is still red."""
    G = nada.load_generator(tiny_ckpt)
    with torch.no_grad():
        img = G(nada.seed_latents(G, [3]))
    img[:, :, 8:16, 8:16] = 0.9
    nada.save_image(img, str(tmp_path / "sq.png"))
    out = tmp_path / "inv"
    args = ["edit", "--img", tmp_path / "sq.png", "--ckpt", red_and_blue_runs["red"], "--lpips", "off", "--steps", 150]
    assert run_cli(*args, "--out", out)[0] == 0
    rc, _, err = run_cli(*args, "--out", out, "--pti", 100)
    assert rc == 0, err
    photo, plain, tuned, red = (nada.load_image(str(p)) for p in (tmp_path / "sq.png", out / "sq.recon.png",
                                                                    out / "sq.pti.png", out / "sq.red.png"))
    print(psnr(plain, photo), psnr(tuned, photo), redness(red, 0) - redness(tuned, 0))
    assert psnr(tuned, photo)[0] > psnr(plain, photo)[0] + 2            # measured: 26.8 -> 30.0 dB
    assert redness(red, 0) > redness(tuned, 0) + 0.1


def test_invert_dry_run_counts_a_1024_px_inversion_without_reading_anything(tmp_path):
    rc, out, err = run_cli("invert", "--dry-run", "--ckpt", "ffhq", "--device", "cuda", "--offline", "--weights-dir",
                           tmp_path / "w", cwd=tmp_path)
    assert rc == 0, err
    assert "nada invert --dry-run | device cuda | 1024 px, batch 1, LPIPS auto" in out
    peak = float(re.search(r"peak +([\d.]+) GiB", out).group(1))
    weights = float(re.search(r"weights +([\d.]+) GiB", out).group(1))
    assert 1.0 < peak < 4.0 and 0.15 < weights < 0.25              # measured: 2.02 and 0.18 (G 0.12, VGG16 0.06)
    assert os.listdir(tmp_path) == []


def test_invert_checks_photos_before_downloads_and_refuses_conditional_generators(tmp_path):
    rc, _, err = run_cli("invert", "--img", tmp_path / "missing.png", "--ckpt", "ffhq", "--offline", "--weights-dir",
                         tmp_path / "w")
    assert_clean_error(rc, err, "missing.png: no such file")
    nada.save_image(torch.zeros(1, 3, 32, 32), str(tmp_path / "p.png"))
    rc, _, err = run_cli("invert", "--img", tmp_path / "p.png", "--ckpt", os.path.join(FIXTURES, "nvidia_32_cond.pkl"),
                         "--lpips", "off", "--out", tmp_path / "o")
    assert_clean_error(rc, err, "is class-conditional (10 classes)")
    assert sorted(os.listdir(tmp_path)) == ["p.png"]


def test_a_16_bit_grey_photo_keeps_its_tones(tmp_path):
    from PIL import Image
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)).save(tmp_path / "g16.png")
    x = nada.load_image(str(tmp_path / "g16.png"))
    assert abs(x.mean().item()) < 0.02 and x[0, :, 0, 0].max() < -0.99 and x[0, :, -1, -1].min() > 0.98


def test_a_phone_photo_is_turned_as_its_camera_was(tmp_path):
    """EXIF orientation 6 (the camera turned 90 degrees clockwise): stored red above blue, shown red on the right."""
    from PIL import Image
    img = Image.new("RGB", (40, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 20, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    x = nada.load_image(str(tmp_path / "phone.jpg"))
    assert x[0, 0, :, 30:].mean() > 0.8 and x[0, 2, :, :10].mean() > 0.8      # red right, blue left
