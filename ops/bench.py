"""Benchmark nada's CUDA ops against the reference ops, the generator, and one training step.

    python ops/bench.py --device cuda --out bench.json     # GPU figures: table on stdout, JSON to --out
    python ops/bench.py --device cpu --res 64 --batch 1 --gen-res 32 --clip ViT-B/32   # the reference path, a quick look

It imports nada from the folder above; nada never imports it.
"""

import argparse
import copy
import functools
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nada  # noqa: E402
from nada import BETAS, LR, SQRT2, Generator, bias_act, default_channels, make_kernel, upfirdn2d  # noqa: E402


def _time_ms(fn, reps=20):
    """Median wall time of fn() in ms, after a warm-up, synchronising the GPU around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _saved_mb(fn):
    """GPU memory held after a forward with grad (what autograd keeps for backward, plus the output), in MB."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fn()
    held = torch.cuda.memory_allocated() - before
    del out
    return held / 2 ** 20


def bench_ops(device, resolutions, batches):
    """Rows of (op, shape, ref ms, cuda ms, speed-up, ref MB, cuda MB) at StyleGAN2's shapes (config-f widths)."""
    rows, k = [], make_kernel().to(device) * 4
    impls = ("ref", "cuda") if device == "cuda" else ("ref",)
    for r in resolutions:
        C = default_channels(r)[r]
        for n in batches:
            x = torch.randn(n, C, r, r, device=device)
            b = torch.randn(C, device=device)
            cases = {
                f"upfirdn2d up2 [{n},3,{r // 2}]": (lambda i, t=torch.randn(n, 3, r // 2, r // 2, device=device):
                                                    upfirdn2d(t, k, up=2, pad=(2, 1, 2, 1), impl=i)),
                f"upfirdn2d down2 [{n},{C},{r}]": lambda i: upfirdn2d(x, k / 4, down=2, pad=(1, 1, 1, 1), impl=i),
                f"upfirdn2d blur [{n},{C},{r + 1}]": (lambda i, t=torch.randn(n, C, r + 1, r + 1, device=device):
                                                      upfirdn2d(t, k, pad=(1, 1, 1, 1), impl=i)),
                f"bias_act fwd [{n},{C},{r}]": lambda i: bias_act(x, b, "lrelu", gain=SQRT2, clamp=256, impl=i),
            }
            xg = x.clone().requires_grad_(True)
            cases[f"bias_act fwd+bwd [{n},{C},{r}]"] = lambda i: bias_act(xg, b, "lrelu", gain=SQRT2, clamp=256,
                                                                          impl=i).sum().backward()
            for name, fn in cases.items():
                ms = {i: _time_ms(lambda: fn(i)) for i in impls}
                mb = {i: _saved_mb(lambda: bias_act(xg, b, "lrelu", gain=SQRT2, clamp=256, impl=i))
                      if name.startswith("bias_act fwd [") else float("nan") for i in impls}
                cu = ms.get("cuda", float("nan"))
                rows.append(dict(op=name, ref_ms=ms["ref"], cuda_ms=cu, speedup=ms["ref"] / cu,
                                 ref_saved_mb=mb["ref"], cuda_saved_mb=mb.get("cuda", float("nan"))))
    return rows


def bench_generator(device, res, batch):
    """Images per second (inference) and forward+backward time of a random generator, per ops path."""
    G = Generator(res).to(device)
    z = torch.randn(batch, G.z_dim, device=device)
    out = {}
    for impl in (("ref", "cuda") if device == "cuda" else ("ref",)):
        G.set_impl(impl)
        with torch.no_grad():
            ms = _time_ms(lambda: G(z), reps=5)
        out[f"{impl}_images_per_s"] = batch * 1e3 / ms
        out[f"{impl}_fwd_bwd_ms"] = _time_ms(lambda: G(z).square().mean().backward(), reps=5)
    return out


def _random_clip(name, device):
    """A CLIP with `name`'s architecture and random weights (the benchmark needs its shape, not its knowledge)."""
    embed, res, layers, width, patch, text_width, heads, text_layers = nada.CLIP_ARCHITECTURES[name]
    model = nada._import_clip().model.CLIP(embed, res, layers, width, patch, 77, 49408, text_width, heads, text_layers)
    return nada.drop_text_tower(model.to(device).eval().requires_grad_(False))


def _step_setup(device, res, batch, impl, memory, clips, layers):
    """The training step of `nada.train` at this size, on random weights: -> (step function, modules, optimiser)."""
    with torch.device(device):
        G0 = Generator(res, impl=impl).requires_grad_(False)
    G = copy.deepcopy(G0)
    G.checkpointing = memory == "low"
    models = [_random_clip(n, device) for n in clips]
    for m in models if memory == "low" and device == "cuda" else ():
        nada._import_clip().model.convert_weights(m)     # as nada.train: half, LayerNorms stay float32
    opt = torch.optim.Adam([p for n, p in G.named_parameters() if not n.startswith("style.")], lr=LR, betas=BETAS)
    targets = [nada.ClipTarget(m, 1.0, F.normalize(torch.randn(m.visual.output_dim, device=device), dim=0),
                               F.normalize(torch.randn(m.visual.output_dim, device=device), dim=0)) for m in models]
    step = functools.partial(nada.train_step, G0, G, opt, targets, layers=nada.parse_layers(layers, G, min(9, G.num_ws - 1)), batch=batch,
                             mixing=0.0, cls=None, rng=torch.Generator().manual_seed(0), device=device)
    return step, [G0, G, *models], opt


def bench_train_step(device, res, batch, impl, memory, clips=("ViT-B/32", "ViT-B/16"), layers="all"):
    """One training step as `nada.train` runs it: time, peak GPU memory and the dry run's estimate of it."""
    estimate = nada.estimate_memory(*_step_setup("meta", res, batch, impl, memory, clips, layers))["peak_bytes"]
    if device == "meta":
        return dict(res=res, batch=batch, impl=impl, memory=memory, estimate_gb=estimate / 2 ** 30)
    step, modules, opt = _step_setup(device, res, batch, impl, memory, clips, layers)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = _time_ms(step, reps=5 if device == "cuda" else 2)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    return dict(res=res, batch=batch, impl=impl, memory=memory, layers=layers, clips=list(clips), step_ms=ms,
                peak_gb=peak, estimate_gb=estimate / 2 ** 30, steps300_s=ms * 300 / 1e3)


def bench_eval(device, res, n, clip, batch=8):
    """`nada.py eval` at this size: n samples through a base and an adapted generator, embedded by one CLIP model
    (random weights), and the metrics: seconds in all."""
    with torch.device(device):
        base = Generator(res).requires_grad_(False)
    G = copy.deepcopy(base)
    model = _random_clip(clip, device)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    samples = nada.Samples(list(range(n)), None, 1.0, batch)
    target = nada.Goal("photo", None, [torch.zeros(1, 3, 64, 64)])   # an image target: this CLIP has no text tower
    nada.measure(base, G, [model], target, samples, device, show=False)
    return dict(res=res, n=n, clip=clip, batch=batch, seconds=time.perf_counter() - t)


def bench(device="auto", res="256,512,1024", batch="1,8", gen_res=1024, out="bench.json", clip="ViT-B/32,ViT-B/16",
          eval_n=None, eval_clip="ViT-L/14"):
    """Print the benchmark as a table and write it as JSON."""
    device = nada.check_device(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    resolutions = [int(r) for r in str(res).split(",")]
    batches = [int(b) for b in str(batch).split(",")]
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"nada bench | {name} | torch {torch.__version__} | ops {nada.ops_status(device)}", flush=True)
    rows = bench_ops(device, resolutions, batches)
    print(f"{'op':<34} {'ref ms':>9} {'cuda ms':>9} {'x':>6} {'ref MB':>8} {'cuda MB':>8}")
    for r in rows:
        print(f"{r['op']:<34} {r['ref_ms']:>9.3f} {r['cuda_ms']:>9.3f} {r['speedup']:>6.2f} "
              f"{r['ref_saved_mb']:>8.1f} {r['cuda_saved_mb']:>8.1f}", flush=True)
    result = dict(device=name, torch=torch.__version__, ops=rows)
    result["generator"] = dict(res=gen_res, batch=2, **bench_generator(device, gen_res, 2))
    print(f"generator {gen_res} px, batch 2: " + ", ".join(f"{k} {v:.2f}" for k, v in result["generator"].items()
                                                         if k not in ("res", "batch")), flush=True)
    clips = clip.split(",")
    result["train_step"] = [bench_train_step(device, gen_res, 2, i, m, clips, layers)
                            for i in (("ref", "cuda") if device == "cuda" else ("ref",))
                            for m in ("fast", "low") for layers in (("all", "auto") if device == "cuda" else ("all",))]
    for t in result["train_step"]:
        print(f"train step {t['res']} px, batch {t['batch']}, {'+'.join(t['clips'])}, layers {t['layers']}, impl "
              f"{t['impl']}, memory {t['memory']}: {t['step_ms']:.1f} ms (300 steps {t['steps300_s']:.0f} s), peak "
              f"{t['peak_gb']:.2f} GiB, dry-run estimate {t['estimate_gb']:.2f} GiB", flush=True)
    result["eval"] = e = bench_eval(device, gen_res, eval_n or (500 if device == "cuda" else 4), eval_clip)
    print(f"eval {e['res']} px, {e['n']} samples, {e['clip']}, batch {e['batch']}: {e['seconds']:.1f} s", flush=True)
    nada.atomic_write_text(out, json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--res", default="256,512,1024", help="resolutions for the op timings")
    p.add_argument("--batch", default="1,8", help="batch sizes for the op timings")
    p.add_argument("--gen-res", type=int, default=1024, help="resolution of the generator and train-step timings")
    p.add_argument("--out", default="bench.json", help="where the JSON goes")
    p.add_argument("--clip", default="ViT-B/32,ViT-B/16", help="CLIP architectures of the train-step timings "
                   f"(random weights; any of {', '.join(nada.CLIP_ARCHITECTURES)})")
    p.add_argument("--eval-n", type=int, default=None, help="samples of the eval timing (default: 500 on CUDA, 4 on the CPU)")
    p.add_argument("--eval-clip", default="ViT-L/14", help="CLIP architecture of the eval timing")
    args = p.parse_args(argv)
    try:
        [int(r) for r in f"{args.res},{args.batch}".split(",")]
    except ValueError:
        p.error(f"--res and --batch take integers separated by commas, got {args.res!r} and {args.batch!r}")
    if args.eval_n is not None and args.eval_n < 2:
        p.error(f"--eval-n takes a number of samples of at least 2, got {args.eval_n}")
    if args.eval_clip not in nada.CLIP_ARCHITECTURES:
        p.error(f"--eval-clip {args.eval_clip!r}: use one of {', '.join(nada.CLIP_ARCHITECTURES)}")
    bench(**vars(args))


if __name__ == "__main__":
    main()
