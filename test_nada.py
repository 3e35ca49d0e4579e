"""Tests for nada.py, CPU first, in the order of nada.py's sections. Run: python -m pytest -q"""

import http.server
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nada

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")             # the reference checkpoints and outputs (fixtures/README.md)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


# ---- ops ----------------------------------------------------------------------------------------------------

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


def _layouts(x):
    """The same values as NCHW-contiguous, channels_last and a non-contiguous view."""
    wide = torch.zeros(*x.shape[:3], x.shape[3] * 2, dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return {"nchw": x, "channels_last": x.to(memory_format=torch.channels_last), "strided": wide[..., ::2]}


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
        fn = lambda t: nada._UpFirDn2dCuda.apply(t, f, up, down, pad, False, 2.0)
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
    assert torch.autograd.gradcheck(lambda t, c: nada._BiasActCuda.apply(t, c, True, 0.2, 1.3, -1.0), (x, b))


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
def test_gpu_generator_cuda_matches_ref_and_double_backward_is_refused():
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
    x = torch.randn(1, 2, 8, 8, device="cuda", requires_grad=True)
    y = nada.upfirdn2d(x, nada.make_kernel().cuda(), up=2, pad=(2, 1, 2, 1), impl="cuda")
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


# ---- generator and loading ----------------------------------------------------------------------------------

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


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


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


def test_hostile_and_broken_checkpoints_raise_one_clear_error_and_run_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {}
    cases["evil.pkl"] = pickle.dumps({"G_ema": _Evil()})
    cases["evil.pt"] = None
    torch.save({"g_ema": _Evil()}, tmp_path / "evil.pt")
    # a legal G_ema whose nested storage bytes hide code: decoding G_ema's storages must be restricted too
    class EvilStorage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (pickle.dumps(_Evil(), protocol=2),))

    class EvilTensor:                                     # pickles as a tensor does, around that storage
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (EvilStorage(), 0, (1,), (1,), False, {}))
    _persistent_pickle(tmp_path / "nested.pkl", types.SimpleNamespace(
        class_name="Generator", state={"_parameters": {"weight": EvilTensor()}, "_modules": {}}))
    cases["nested.pkl"] = None
    full = open(os.path.join(FIXTURES, "nvidia_32.pkl"), "rb").read()
    cases["truncated.pkl"] = full[:len(full) // 2]
    cases["garbage.pkl"] = b"this is not a pickle at all"
    cases["tf.pkl"] = b"\x80\x04\x8c\x14dnnlib.tflib.network\x94\x8c\x07Network\x94\x93\x94."
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    torch.save({"g_ema": {"style.1.weight": torch.zeros(2, 2)}}, tmp_path / "wrong.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    good = torch.load(os.path.join(FIXTURES, "rosinality_32.pt"), weights_only=False)
    bad = dict(good["g_ema"], **{"convs.1.conv.weight": torch.zeros(1, 64, 64, 1, 1)})
    torch.save({"g_ema": bad, "latent_avg": good["latent_avg"]}, tmp_path / "shape.pt")
    torch.save({"g_ema": good["g_ema"], "latent_avg": torch.zeros(3)}, tmp_path / "avg.pt")
    expected = {"evil.pkl": "posix.system", "evil.pt": "posix.system", "nested.pkl": "posix.system", "truncated.pkl": "refused",
                "garbage.pkl": "refused", "tf.pkl": "TensorFlow", "wrong.pt": "not a StyleGAN2 generator",
                "other.pt": "no generator found", "missing.pt": "no such file", "shape.pt": "do not fit",
                "avg.pt": "latent_avg is not a vector of 64"}
    for name, words in expected.items():
        with pytest.raises(nada.NadaError) as e:
            nada.load_generator(tmp_path / name)
        assert name in str(e.value) and words in str(e.value), str(e.value)
    assert not (tmp_path / "PWNED").exists()
    rc, _, err = run_cli("sample", "--ckpt", tmp_path / "evil.pkl", cwd=tmp_path)
    assert_clean_error(rc, err, "evil.pkl")
    assert not (tmp_path / "PWNED").exists()


def test_loading_costs_one_copy_of_the_weights(tmp_path):
    """Meta-device construction + assign: no random init and no second copy. The file is memory-mapped and
    only g_ema is copied out of it, so the process's private memory grows by one copy of the weights."""
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


# ---- weights: downloads ---------------------------------------------------------------------------------------

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


# ---- loss ---------------------------------------------------------------------------------------------------

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


def test_text_direction_is_template_mean_of_normalised_differences(colour_clip):
    model = nada.load_clip(colour_clip)
    templates = ("a {}.", "a photo of a {}.", "{} art")
    d = nada.text_direction(model, "photo", "red photo", templates)
    clip = nada._import_clip()
    with torch.no_grad():
        enc = lambda t: F.normalize(model.encode_text(clip.tokenize([tp.format(t) for tp in templates])).float(), dim=-1)
        expected = F.normalize((enc("red photo") - enc("photo")).mean(0), dim=0)
    assert torch.allclose(d, expected, atol=1e-6)
    assert d[0] > 0.9                                     # the colour CLIP: "red" lives on axis 0


def test_clip_preprocess_uses_the_models_own_resolution():
    class V:
        input_resolution = 24
    model = types.SimpleNamespace(visual=V())
    x = nada.clip_preprocess(torch.zeros(2, 3, 64, 96), model)
    assert x.shape == (2, 3, 24, 24)
    assert torch.allclose(x[0, :, 0, 0], (0.5 - torch.tensor(nada.CLIP_MEAN)) / torch.tensor(nada.CLIP_STD))


# ---- freezing -----------------------------------------------------------------------------------------------

def tiny_generator(seed=0, size=32, impl="ref"):
    torch.manual_seed(seed)
    G = nada.Generator(size, style_dim=32, n_mlp=2, channels={4: 32, 8: 32, 16: 32, 32: 16, 64: 16}, impl=impl)
    with torch.no_grad():
        G.latent_avg = G.mapping(torch.randn(512, 32))[:, 0].mean(0)
    return G


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
    for bad, k in (("last:9", None), ("64", None), ("some", None), ("16,", None), ("auto", 0), ("auto", 9)):
        with pytest.raises(nada.NadaError, match="--auto-k" if k is not None else "--layers"):
            nada.parse_layers(bad, G, auto_k=k)


def test_gradients_only_on_selected_layers():
    G = tiny_generator()
    n = nada.set_trainable(G, ["convs.4", "to_rgbs.2"])
    G.synthesis(G.mapping(torch.randn(2, 32))).square().mean().backward()
    with_grad = {k for k, p in G.named_parameters() if p.grad is not None}
    assert with_grad and all(k.startswith(("convs.4.", "to_rgbs.2.")) for k in with_grad)
    assert n == sum(p.numel() for k, p in G.named_parameters() if k.startswith(("convs.4.", "to_rgbs.2.")))


# ---- train ----------------------------------------------------------------------------------------------------

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


def test_train_cli_end_to_end_then_sample(tmp_path, colour_clip, tiny_ckpt):
    out = tmp_path / "run"
    rc, stdout, err = run_cli("train", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--src", "photo", "--tgt",
                              "red photo", "--iters", 40, "--layers", "all", "--out", out, "--sample-every", 20)
    assert rc == 0, err
    assert "ops ref (cpu)" in stdout and "layers" in stdout and str(out) in stdout
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
    direction = nada.text_direction(model, "photo", f"{word} photo")
    with torch.no_grad():
        loss = nada.directional_loss(nada.encode_images(model, before), nada.encode_images(model, after), direction)
    assert loss < 0.5


def test_step_zero_is_finite_and_small(colour_clip):
    G0 = tiny_generator().requires_grad_(False)
    G = tiny_generator()
    model = nada.load_clip(colour_clip)
    targets = [nada.ClipTarget(model, 1.0, nada.text_direction(model, "photo", "red photo"), None)]
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
    out = nada.train(tgt="blue photo", ckpt=os.path.join(FIXTURES, "nvidia_32_cond.pkl"), cls="all", iters=2,
                     layers="last:2", out=str(tmp_path / "c"), clip=colour_clip, progress=False)
    G = nada.load_generator(os.path.join(out, "generator.pt"))
    assert G.c_dim == 10 and G.conv_clamp == 256


def test_train_bad_input(tmp_path, colour_clip, tiny_ckpt):
    base = ["train", "--ckpt", tiny_ckpt, "--clip", colour_clip, "--iters", 2, "--out", tmp_path / "ok"]
    cases = [
        (["--src", "", "--tgt", "x"], "non-empty"),
        (["--src", "Photo", "--tgt", "photo"], "the same"),
        (["--clip", "ViT-Z/99"], "unknown CLIP model"),
        (["--clip-weights", "1,2"], "2 values for 1 CLIP models"),
        (["--ckpt", tmp_path / "nope.pt"], "neither a file nor a known model"),
        (["--ckpt", colour_clip], "no generator found"),
        (["--class", "cat"], "unconditional"),
        (["--out", "/proc/nada_cannot_write"], "cannot write the output folder"),
        (["--layers", "last:0"], "--layers"),
        (["--tgt-img", tmp_path / "missing.png"], "no such file"),
        (["--sample-every", 0], "--sample-every 0: must be at least 1"),
        (["--mixing", 1.5], "--mixing 1.5: must be between 0 and 1"),
    ]
    for extra, words in cases:
        rc, _, err = run_cli(*base, *extra, cwd=tmp_path)
        assert_clean_error(rc, err, words)
    rc, _, err = run_cli(*base, "--tgt", "red photo")
    assert rc == 0, err
    rc, _, err = run_cli(*base, "--tgt", "red photo", "--resume", tmp_path / "ok", "--lr", "0.1")
    assert_clean_error(rc, err, "--lr")
    rc, _, err = run_cli(*base, "--tgt", "red photo")
    assert_clean_error(rc, err, "holds a run already")


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


def test_parse_seeds():
    assert nada.parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    for bad in ("3-1", "a", "1,,2"):
        with pytest.raises(nada.NadaError):
            nada.parse_seeds(bad)


def test_sample_bad_input(tmp_path):
    cond, plain = os.path.join(FIXTURES, "nvidia_32_cond.pkl"), os.path.join(FIXTURES, "nvidia_32.pkl")
    assert_clean_error(*run_cli("sample", cwd=tmp_path)[::2], "runs/*/generator.pt")
    assert_clean_error(*run_cli("sample", "--ckpt", plain, "--class", "cat", cwd=tmp_path)[::2], "unconditional")
    assert_clean_error(*run_cli("sample", "--ckpt", cond, "--class", "dragon", cwd=tmp_path)[::2], "unknown class")
    assert_clean_error(*run_cli("sample", "--ckpt", cond, cwd=tmp_path)[::2], "class-conditional")
    assert_clean_error(*run_cli("sample", "--ckpt", plain, "--seeds", "9-1", cwd=tmp_path)[::2], "--seeds")


# ---- untrusted files (issue 12, part A) ----------------------------------------------------------------------
# Every file nada reads is untrusted: each must load, or raise one NadaError in words, within a time and memory
# bound, and run nothing. Loads happen in a subprocess with a memory cap and a per-case alarm (_WORKER).

import contextlib
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
        (nada.load_clip if kind == "clip" else nada.load_generator)(path)
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
    w, flat = torch.randn(64, 64), torch.randn(65 * 64)
    return {"stride0_6gb.pt": ckpt(**{"style.1.weight": torch.zeros(1).expand(40_000, 40_000)}),
            "stride0_4tb.pt": ckpt(**{"style.1.weight": torch.zeros(1).expand(1_000_000, 1_000_000)}),
            "stride0_right_shape.pt": ckpt(**{"convs.1.conv.weight": torch.zeros(1).expand(1, 64, 64, 3, 3)}),
            "input_1d.pt": ckpt(**{"input.input": torch.zeros(64)}),
            "config_string.pt": ckpt(config={"lr_mlp": "0.01"}),
            "config_list.pt": ckpt(config={"conv_clamp": [256]}),
            "config_nan.pt": ckpt(config={"conv_clamp": float("nan")}),
            "config_negative.pt": ckpt(config={"lr_mlp": -1.0}),
            "shared_weights.pt": ckpt(**{"style.1.weight": w, "style.2.weight": w}),
            "overlapping_weights.pt": ckpt(**{"style.1.weight": flat[:4096].view(64, 64),
                                              "style.2.weight": flat[64:4160].view(64, 64)}),
            "integer_weights.pt": ckpt(**{"style.1.weight": torch.ones(64, 64, dtype=torch.int64)}),
            "base_list.pt": ckpt(base=["ffhq"])}


HOSTILE = {  # file -> words its NadaError must say (every one must fail cleanly, fast and small)
    **{f"claim_{op}.pkl": "ends early" for op in ("bytearray8", "binbytes8", "binunicode8", "frame", "long4",
                                                  "binunicode", "binbytes")},
    "laughs_class_name.pkl": "class name", "laughs_architecture.pkl": "list", "shared_subtrees.pkl": "appears twice", "cyclic_modules.pkl": "appears twice",
    "deep_modules.pkl": "deeper than", "wide_modules.pkl": "larger than", "hash_bomb.pkl": "dictionary key",
    "hash_bomb.pt": "dictionary key", "deep_lists.pkl": "no 'G_ema'", "stride0_6gb.pt": "do not fit",
    "stride0_4tb.pt": "do not fit", "stride0_right_shape.pt": "more bytes than are stored",
    "input_1d.pt": "not a StyleGAN2", "config_string.pt": "positive number", "config_list.pt": "positive number",
    "config_nan.pt": "positive number", "config_negative.pt": "positive number",
    "shared_weights.pt": "share their bytes", "overlapping_weights.pt": "share their bytes",
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


@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_torchscript_clip_is_read_as_data_and_matches_jit_load(tmp_path, variant):
    """OpenAI's CLIP files are traced TorchScript archives: nada reads their tensors without running the archive,
    and gets exactly torch.jit.load's state dict and clip.load's embeddings."""
    import clip
    vision_layers, res = (1, 32) if variant == "vit" else ((1, 1, 1, 1), 64)
    m = _tiny_clip(vision_layers, res)
    img, tokens = torch.randn(2, 3, res, res), clip.tokenize(["a red photo", "blue"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(m, (img, tokens)).save(tmp_path / "traced.pt")
        expected = torch.jit.load(tmp_path / "traced.pt").state_dict()
        reference = clip.load(str(tmp_path / "traced.pt"), device="cpu", jit=False)[0].float()
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
    sd = nada._read_torchscript(str(tmp_path / "scripted.pt"))
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
        print(f"\nfuzz: {len(cases)} cases ({n_cases} mutated, {len(cases) - n_cases} hostile): "
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
