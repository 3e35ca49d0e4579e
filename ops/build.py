"""Build and load nada's CUDA ops: toolkit discovery, architectures, a hashed build folder, an flock.

nada.py imports this file from its own folder at the first CUDA use of an op (never at import), so nada.py
without ops/ runs on the reference ops. Also a command:

    python ops/build.py              # compile both ops now (nvcc is enough, no GPU needed)
    python ops/build.py --cuda-home  # print the CUDA toolkit root that the build will use
"""

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings

import torch

OPS_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCES = {"bias_act": ("bias_act.cpp", "bias_act.cu", "bias_act.h", "common.h"),
           "upfirdn2d": ("upfirdn2d.cpp", "upfirdn2d.cu", "upfirdn2d.h", "common.h")}


def cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, else where `nvcc` really lives (following a wrapper script), else
    /usr/local/cuda. A root counts only if it holds bin/nvcc and the CUDA runtime library."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with contextlib.suppress(OSError, UnicodeDecodeError):   # a shell wrapper: `exec /real/bin/nvcc "$@"`
            m = re.search(r"(/\S+)/bin/nvcc\b", open(nvcc, errors="strict").read(4096))
            candidates.append(m and m.group(1))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        libs = [os.path.join(root, d) for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                any(f.startswith("libcudart.so") for d in libs if os.path.isdir(d) for f in os.listdir(d)):
            return root
    return None


# A GPU-less build (CI, a build host): native code for Ampere (sm_80, which also runs on sm_86/sm_89) and for
# Hopper (sm_90: H100/H200 start without a PTX JIT, and sm_80 code cannot run there natively), plus sm_90 PTX that
# the driver JIT-compiles for anything newer.
GPU_LESS_ARCHS = "8.0;9.0+PTX"


def cuda_arch_list():
    """GPU architectures to compile for: $TORCH_CUDA_ARCH_LIST, else the visible GPUs, else GPU_LESS_ARCHS."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return GPU_LESS_ARCHS


def arch_runs_on(arch_list, cap):
    """Whether code built for arch_list ("7.5;8.0+PTX", "9.0a", "8.6 9.0") runs on a GPU of capability cap:
    native code of the same major and a minor <= the GPU's (an "a" build: that exact GPU only), or PTX from an
    architecture <= the GPU's, which the driver compiles."""
    for entry in re.split(r"[;\s,]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry, re.IGNORECASE)
        if not m:
            continue
        arch, special, ptx = (int(m.group(1)), int(m.group(2))), m.group(3), m.group(4)
        if ptx and not special and arch <= tuple(cap):
            return True
        if arch == tuple(cap) or (not special and arch[0] == cap[0] and arch[1] <= cap[1]):
            return True
    return False


def build_dir(op):
    """Where a compiled op lives: keyed by its sources, torch/CUDA versions and GPU architectures."""
    h = hashlib.sha256(f"{torch.__version__} {torch.version.cuda} {cuda_arch_list()}".encode())
    for name in SOURCES[op]:
        h.update(name.encode() + open(os.path.join(OPS_DIR, name), "rb").read())
    root = os.environ.get("NADA_OPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nada_ops")
    return os.path.join(root, f"{op}-{h.hexdigest()[:16]}")


@functools.lru_cache(maxsize=None)
def load_op(op, require_gpu=True):
    """Build (once per process, lazily) and load one op's extension. -> (torch.ops.nada, None) or (None, reason)."""
    if not all(os.path.isfile(os.path.join(OPS_DIR, n)) for n in SOURCES[op]):
        return None, f"no CUDA sources in {OPS_DIR}"
    if require_gpu and not torch.cuda.is_available():
        return None, "no CUDA device"
    if torch.version.cuda is None:
        return None, "this torch is a CPU build"
    home = cuda_home()
    if home is None:
        return None, "CUDA toolkit (nvcc) not found: set CUDA_HOME"
    if require_gpu:
        cap = torch.cuda.get_device_capability()
        if not arch_runs_on(cuda_arch_list(), cap):
            reason = f"TORCH_CUDA_ARCH_LIST={cuda_arch_list()!r} has no code for this GPU (sm_{cap[0]}{cap[1]})"
            warnings.warn(f"nada: CUDA op {op} unavailable ({reason}); using the reference op.")
            return None, reason
    try:
        build_op(op, home)
        if require_gpu:
            smoke_test(op)                              # a kernel image that cannot run fails here, not mid-training
        return torch.ops.nada, None
    except Exception as e:                              # a failed build is remembered: never retried per call
        errors = [ln.strip() for ln in str(e).splitlines() if "error" in ln and "Error building" not in ln]
        reason = f"build failed: {errors[0][:300] if errors else str(e).strip().splitlines()[0][:300]}"
        warnings.warn(f"nada: CUDA op {op} unavailable ({reason}); using the reference op. Retry with "
                      f"`python nada.py doctor --build-ops`, full log with NADA_VERBOSE_BUILD=1.")
        return None, reason


def smoke_test(op):
    """Run the op once on a tiny CUDA tensor and wait for it."""
    x = torch.ones(1, 2, 4, 4, device="cuda")
    if op == "bias_act":
        torch.ops.nada.bias_act(x, None, True, 0.2, 1.0, -1.0)
    else:
        torch.ops.nada.upfirdn2d(x, torch.ones(4, 4, device="cuda"), 1, 1, 2, 1, 2, 1, False, 1.0)
    torch.cuda.synchronize()


@contextlib.contextmanager
def env(**values):
    """Set environment variables for the duration of a block only (the build reads them; nothing else should)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_op(op, home):
    """Compile with ninja in a private folder under a lock, publish it with an atomic rename, load the library,
    register its fake functions and autograd formula (register.py)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)                         # silence its "no CUDA runtime" notice on GPU-less builds
    with env(CUDA_HOME=home):                           # before torch's import-time guess, which may be wrong
        from torch.utils import cpp_extension
    log.setLevel(level)
    cpp_extension.CUDA_HOME = home
    final = build_dir(op)
    lib = os.path.join(final, f"nada_{op}.so")
    if not os.path.isfile(lib):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with file_lock(final + ".lock"):
            if not os.path.isfile(lib):                 # another process may have built it while we waited
                work = tempfile.mkdtemp(prefix=f".{op}-", dir=os.path.dirname(final))
                try:
                    sources = [os.path.join(OPS_DIR, n) for n in SOURCES[op] if not n.endswith(".h")]
                    # No --use_fast_math: there is nothing transcendental to speed up, and it flushes denormals,
                    # which would make the GPU differ from the CPU twin.
                    with env(CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=cuda_arch_list()):
                        cpp_extension.load(f"nada_{op}", sources, build_directory=work, is_python_module=False,
                                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
                                           verbose=bool(os.environ.get("NADA_VERBOSE_BUILD")))
                    shutil.rmtree(final, ignore_errors=True)   # a partial folder left by an older failure
                    os.replace(work, final)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    if not hasattr(torch.ops.nada, op):
        torch.ops.load_library(lib)
    register_module().register(op)


def register_module():
    """register.py beside this file, one instance per process however often build.py itself is loaded (it
    remembers what it has registered, and torch.library refuses a second registration)."""
    if "nada_ops_register" not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location("nada_ops_register", os.path.join(OPS_DIR, "register.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["nada_ops_register"] = module
    return sys.modules["nada_ops_register"]


def ninja():
    """Where ninja is (on PATH, or the pip package's), or how to get it."""
    with contextlib.suppress(ImportError):
        import ninja as package
        return shutil.which("ninja") or os.path.join(package.BIN_DIR, "ninja")
    return shutil.which("ninja") or "not found (pip install ninja)"


@contextlib.contextmanager
def file_lock(path, timeout=900):
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


def doctor(build=False):
    """Print the toolkit and ninja; with build, compile both ops now (no GPU needed). -> False if a build failed."""
    print(f"CUDA toolkit {cuda_home() or 'not found (set CUDA_HOME to the folder holding bin/nvcc)'}")
    print(f"ninja        {ninja()}")
    ok = True
    for name in SOURCES if build else ():
        t0 = time.time()
        ops, reason = load_op(name, require_gpu=False)
        print(f"build {name:<10}{'ok' if ops else 'FAILED: ' + reason} ({time.time() - t0:.1f} s, {build_dir(name)})")
        ok = ok and ops is not None
    return ok


if __name__ == "__main__":
    if sys.argv[1:] == ["--cuda-home"]:
        print(cuda_home() or "")
        sys.exit(0)
    sys.exit(0 if doctor(build=True) else 1)
