"""Count the SASS instructions of nada's kernels (no GPU needed): compile each .cu to a cubin for one
architecture with `-Xptxas -v`, disassemble it with cuobjdump, and print per kernel the registers, shared memory
and for each loop the instructions per output element.

    python ops/sass_count.py              # sm_90
    python ops/sass_count.py --arch 80 --dump sass/   # also write the disassembly

How loops are counted: a loop body is the instruction range from a backward branch's target up to that branch
(NOPs not counted). For each loop the script prints its instruction count and the output elements its global
stores write per turn (an STG.128 of floats writes 4), and their ratio: instructions per output. Branches inside
a body are counted as if every instruction ran (an upper bound for the tile loops, exact for straight-line ones).
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90")
    p.add_argument("--dump", default=None, help="folder for the .sass text")
    p.add_argument("--filter", default="", help="only kernels whose demangled name contains this")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for src in ("upfirdn2d.cu", "bias_act.cu"):
            cubin, log = compile_cubin(os.path.join(OPS_DIR, src), args.arch, tmp)
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

if __name__ == "__main__":
    main()
