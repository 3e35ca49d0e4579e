"""Count the SASS instructions of nada's kernels (no GPU needed): compile each .cu to a cubin for one
architecture with `-Xptxas -v`, disassemble it with cuobjdump, and print per kernel the registers, shared memory
and for each loop the instructions per output element; then the effective figures at the shapes a 1024 px
StyleGAN2 training step runs (batch 2): main loop, setup, and both together per output.

    python ops/sass_count.py              # sm_90
    python ops/sass_count.py --arch 80 --dump sass/   # also write the disassembly
    python ops/sass_count.py --src old/ops            # count another copy of the sources (same launch plans)

How loops are counted: a loop body is the instruction range from a backward branch's target up to that branch
(NOPs not counted). For each loop the script prints its instruction count and the output elements its global
stores write per turn (an STG.128 of floats writes 4), and their ratio: instructions per output. Branches inside
a body are counted as if every instruction ran (an upper bound for the tile loops, exact for straight-line ones).

Effective figures: per kernel, the main loop is the loop (or the pair: an unrolled x4 loop and its remainder) whose
stores write the outputs. Each loop around it (bias_act: a thread's chunks; its gradient: the windows, with their
sums; upfirdn2d: the planes) counts its own instructions once per turn,
and every other instruction is the setup, counted once per thread (an upper bound: branches not taken count too).
The launch plans of ops/*.h are mirrored below (plan_upfirdn2d_small, plan_bias_act: keep them in step), which give
per shape how many turns of each loop a thread makes.
effective = (setup + turns * loops) / outputs, summed over every thread of the launch. For upfirdn2d that is per
output computed; "used" is the share of computed outputs that lie inside the image (a 64 x 16 tile over an 8 x 8
output computes 16 times what it keeps), and "per kept" divides by it.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

OPS_DIR = os.path.dirname(os.path.abspath(__file__))


def tool(name):
    """nvcc from the toolkit build.py finds; cuobjdump from there or, failing that, the copy triton ships."""
    sys.path.insert(0, OPS_DIR)
    import build
    home = build.cuda_home() or "/usr/local/cuda"
    path = os.path.join(home, "bin", name)
    if os.path.isfile(path):
        return path
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.isfile(path) else shutil.which(name)


def compile_cubin(src, arch, out_dir):
    from torch.utils import cpp_extension
    inc = sum((["-I", p] for p in cpp_extension.include_paths(device_type="cuda")), [])
    cubin = os.path.join(out_dir, os.path.basename(src) + ".cubin")
    cmd = [tool("nvcc"), "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++20", "-Xptxas", "-v",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *cpp_extension.COMMON_NVCC_FLAGS, "-D_GLIBCXX_USE_CXX11_ABI=1", *inc, "-o", cubin, src]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    return cubin, r.stderr


def ptxas_usage(log):
    """{mangled kernel: 'N registers, M bytes smem'} from ptxas -v."""
    usage, name = {}, None
    for ln in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", ln)
        if m:
            name = m.group(1)
        m = re.search(r"Used (\d+) registers", ln)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", ln)
            usage[name] = f"{m.group(1)} regs, {smem.group(1) if smem else 0} B static smem"
    return usage


def kernels(sass):
    """{mangled name: [(address, opcode text)]} from cuobjdump -sass."""
    out, cur = {}, None
    for ln in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", ln)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", ln)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def loops(ins):
    """Every loop (a backward branch and its target), innermost first: (instructions, outputs written), where the
    outputs are the elements its global stores write (STG.128 of floats: 4, STG.64: 2, ... by the element size)."""
    real = [(a, t) for a, t in ins if not re.match(r"(@\S+\s+)?NOP\b", t)]
    found = []
    for a, t in real:
        tgt = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)
        if tgt and int(tgt.group(1), 16) < a:
            body = [u for b, u in real if int(tgt.group(1), 16) <= b <= a]
            bits = sum(int(m.group(1) or 32) for u in body for m in [re.search(r"\bSTG\.E(?:\.U?(\d+))?", u)] if m)
            found.append((len(body), bits))
    return sorted(set(found))


def store_loops(ins, elem_bits):
    """[(instructions, outputs per turn)] of the innermost loops that store outputs, the instructions outside every
    loop around them (the setup, once per thread), and the instructions of each loop around them that are its own
    (not in a loop it holds), innermost first."""
    real = [(a, t) for a, t in ins if not re.match(r"(@\S+\s+)?NOP\b", t)]
    spans = []
    for a, t in real:
        tgt = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)
        if tgt and int(tgt.group(1), 16) < a:
            spans.append((int(tgt.group(1), 16), a))
    found, inside, store_spans = [], set(), []
    for lo, hi in spans:
        if any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi) for l2, h2 in spans):
            continue                                    # not innermost
        body = [(b, u) for b, u in real if lo <= b <= hi]
        bits = sum(int(m.group(1) or 32) for _, u in body for m in [re.search(r"\bSTG\.E(?:\.U?(\d+))?", u)] if m)
        if bits:
            found.append((len(body), bits // elem_bits))
            inside.update(b for b, _ in body)
            store_spans.append((lo, hi))
    # The loops around the store loops, innermost first (bias_act: a thread's chunks; its gradient: the windows;
    # upfirdn2d: the planes): each one's own instructions run once per its turn.
    outer = sorted(((lo, hi) for lo, hi in spans if store_spans and all(lo <= a and b <= hi and (a, b) != (lo, hi)
                                                                        for a, b in store_spans)),
                   key=lambda sp: sp[1] - sp[0])
    levels, counted = [], set(inside)
    for lo, hi in outer:
        own = {b for b, _ in real if lo <= b <= hi} - counted
        levels.append(len(own))
        counted |= own
    return sorted(found, key=lambda f: f[1]), len(real) - len(counted), levels


def main_loop_cost(found, turns):
    """Instructions of `turns` turns of the main loop: an unrolled loop (4 turns per pass) and its remainder."""
    if len(found) >= 2 and found[-1][1] == 4 * found[0][1]:
        return (turns // 4) * found[-1][0] + (turns % 4) * found[0][0]
    return turns * found[-1][0]


# The launch plans, mirrored from ops/*.h.
BLOCK = 256
TARGET_BLOCKS = 4096
TARGET_TILE_BLOCKS = 4096       # upfirdn2d.h kTargetTileBlocks
MAX_LOOP = 16                   # upfirdn2d.h kMaxLoop
TURNS = 4                       # bias_act.h kTurns
VECTOR_BYTES = 32               # bias_act.h kVectorBytes


def plan_upfirdn2d_small(N, C, outH, outW, shifty=0):
    """-> (blocks along a tile column: [(tiles, planes entered) of each], tiles along a row, tiles along a column)."""
    tilesX, tilesY = (outW + 63) // 64, (outH + shifty + 15) // 16
    planes = N * C
    slots = planes * tilesY
    loop = min(max((slots * tilesX + TARGET_TILE_BLOCKS - 1) // TARGET_TILE_BLOCKS, 4), MAX_LOOP, slots)
    blocks = []
    for k0 in range(0, slots, loop):
        k1 = min(k0 + loop, slots)
        blocks.append((k1 - k0, (k1 - 1) // tilesY - k0 // tilesY + 1))
    return blocks, tilesX, tilesY


def plan_bias_act(shape, elem_bytes):
    """-> (vector width, [(chunks a thread of a row group walks, rows of each: [..]) per thread], ...): here
    [(threads, chunks per thread, rows per chunk)] grouped by equal work."""
    C, numel = shape[1], 1
    for d in shape:
        numel *= d
    inner = numel // (shape[0] * C)                     # contiguous NC...: stride(1)
    K = C * inner
    rows, vmax = numel // K, VECTOR_BYTES // elem_bytes
    V = vmax if (inner % vmax == 0 or (inner == 1 and C % vmax == 0)) else 1
    chunks = K // V
    windows = (chunks + BLOCK - 1) // BLOCK
    want = (rows * chunks + BLOCK * TURNS - 1) // (BLOCK * TURNS)
    blocks = max(1, min(want, TARGET_BLOCKS))
    gx = min(blocks, windows)
    G = max(1, min(blocks // gx, rows, 65535))
    work = {}
    for bx in range(gx):                                # chunks per thread (by its window)
        nk = (windows - bx + gx - 1) // gx
        for g in range(G):
            t = (rows - g + G - 1) // G
            work[(nk, t)] = work.get((nk, t), 0) + BLOCK
    active = chunks / (windows * BLOCK)                 # the last window's idle threads: not counted
    return V, [(n * active, nk, t) for (nk, t), n in work.items()]


def stylegan2_shapes(size=1024, batch=2):
    """The op calls of one training step of a `size` px generator (channel multiplier 2), forward and backward:
    {op: [(shape label, args)]}."""
    ch = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    res = [r for r in ch if 8 <= r <= size]
    return {
        "blur": [((batch, ch[r], r + 1, r + 1), (r, r)) for r in res] +            # after the transposed conv
                [((batch, ch[r], r, r), (r + 1, r + 1)) for r in res],             # its gradient
        "up2": [((batch, 3, r // 2, r // 2), (r, r)) for r in res],                 # the skip image
        "down2": [((batch, 3, r, r), (r // 2, r // 2)) for r in res],              # its gradient
        "bias_act": [(batch, 512)] + [(batch, ch[r], r, r) for r in [4] + res] + [(batch, 3, r, r) for r in [4] + res],
    }


def effective(kernels_found, dtypes=("float", "c10::Half", "c10::BFloat16")):
    """Rows of the effective table: (kernel, dtype, shape, main loop per output, setup per output, effective,
    used share)."""
    rows = []
    calls = stylegan2_shapes()
    for dt in dtypes:
        elem = {"float": 4, "c10::Half": 2, "c10::BFloat16": 2}[dt]
        for op, up, down in (("blur", 1, 1), ("up2", 2, 1), ("down2", 1, 2)):
            k = kernels_found.get((f"upfirdn2d_small_kernel<{up}, {down}, {dt}>", None))
            if not k:
                continue
            found, setup, levels = k
            for shape, (oh, ow) in calls[op]:
                blocks, tilesX, tilesY = plan_upfirdn2d_small(shape[0], shape[1], oh, ow)
                loop_only = sum(main_loop_cost(found, t) for t, _ in blocks) * BLOCK
                per_col = loop_only + sum(setup + n * sum(levels) for _, n in blocks) * BLOCK   # per plane entered
                outs = sum(t for t, _ in blocks) * BLOCK * 4
                used = oh * ow / (tilesX * 64 * tilesY * 16)
                rows.append((op, dt, f"{list(shape)}", loop_only / outs, (per_col - loop_only) / outs,
                             per_col / outs, used))
        for kind in ("bias_act_kernel", "bias_act_grad_kernel"):
            for shape in calls["bias_act"]:
                V, work = plan_bias_act(shape, elem)
                ch = "true" if V > 1 and len(shape) == 2 else "false"     # inner 1: V channels per vector
                name = f"{kind}<{V}, {ch}, {dt}>" if kind == "bias_act_kernel" else f"{kind}<{V}, {ch}, false, {dt}>"
                k = kernels_found.get((name, None))
                if not k:
                    continue
                found, setup, levels = k
                loop_only = sum(n * nk * main_loop_cost(found, t) for n, nk, t in work)
                # forward: the chunk loop; gradient: the window loop with its sums: nk turns
                total = loop_only + sum(n * (setup + nk * sum(levels)) for n, nk, t in work)
                outs = sum(n * nk * t for n, nk, t in work) * V
                rows.append(("bias_act" if kind == "bias_act_kernel" else "bias_act grad", dt, f"{list(shape)}",
                             loop_only / outs, (total - loop_only) / outs, total / outs, 1.0))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90")
    p.add_argument("--dump", default=None, help="folder for the .sass text")
    p.add_argument("--filter", default="", help="only kernels whose demangled name contains this")
    p.add_argument("--src", default=OPS_DIR, help="the folder of the .cu/.h sources to count (default: ops/)")
    p.add_argument("--all-shapes", action="store_true", help="print every shape, not just the worst per op")
    args = p.parse_args(argv)
    found_by_name = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in ("upfirdn2d.cu", "bias_act.cu"):
            cubin, log = compile_cubin(os.path.join(args.src, src), args.arch, tmp)
            usage = ptxas_usage(log)
            sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                open(os.path.join(args.dump, src + f".sm{args.arch}.sass"), "w").write(sass)
            names = list(kernels(sass).items())
            dem = subprocess.run(["c++filt"], input="\n".join(n for n, _ in names), capture_output=True,
                                 text=True).stdout.splitlines()
            for (name, ins), d in zip(names, dem):
                if args.filter and args.filter not in d:
                    continue
                bits = {"double": 64, "float": 32, "c10::Half": 16, "c10::BFloat16": 16}
                elem = next((v for k, v in bits.items() if re.search(rf"<[^>]*\b{re.escape(k)}\b", d)), 32)
                total = sum(1 for _, t in ins if not re.match(r"(@\S+\s+)?NOP\b", t))
                desc = ", ".join(f"{n} instr/{b // elem} out = {n / (b // elem):.0f}" if b else f"{n} instr"
                                 for n, b in loops(ins))
                print(f"{d[:140]}\n    {usage.get(name, '?')}; {total} instructions; loops: {desc}")
                short = re.match(r"void (\w+<[^(]*>)\(", d)
                if short:
                    found, setup, levels = store_loops(ins, elem)
                    if found:
                        found_by_name[(short.group(1), None)] = (found, setup, levels or [0])
                        print(f"    main loop {found}, setup {setup} instructions, per turn of the loops around "
                              f"it {levels or [0]}")
    rows = effective(found_by_name)
    print(f"\nEffective instructions per output at the shapes of a 1024 px StyleGAN2 step, batch 2, sm_{args.arch} "
          f"(main loop + setup = effective; used: share of computed outputs inside the image)")
    print(f"{'op':<14}{'dtype':<15}{'shape':<22}{'loop':>7}{'setup':>7}{'effective':>10}{'used':>7}{'per kept':>9}")
    by_op = {}
    for r in rows:
        by_op.setdefault((r[0], r[1]), []).append(r)
    for key, rs in by_op.items():
        shown = rs if args.all_shapes else sorted(rs, key=lambda r: r[5])[-1:]
        for op, dt, shape, lp, st, eff, used in shown:
            print(f"{op:<14}{dt.replace('c10::', ''):<15}{shape:<22}{lp:>7.1f}{st:>7.1f}{eff:>10.1f}{used:>7.2f}"
                  f"{eff / used:>9.1f}" + ("" if args.all_shapes else f"   (worst of {len(rs)} shapes; best "
                                           f"{min(r[5] for r in rs):.1f})"))

if __name__ == "__main__":
    main()
