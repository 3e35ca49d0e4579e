"""Count the SASS instructions of nada's kernels (no GPU needed): compile each .cu to a cubin for one
architecture with `-Xptxas -v`, disassemble it with cuobjdump, and print per kernel the registers, shared memory
and the static instruction count of its hot loop.

    python ops/sass_count.py              # sm_90
    python ops/sass_count.py --arch 80 --dump sass/   # also write the disassembly

How the hot loop is found: the loop body is the instruction range from a backward branch's target up to that
branch; the outermost such range (the longest) is reported, with no NOP and no EXIT counted. Divide it by the
outputs one turn of that loop produces (the table says how many) to get instructions per output.
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


def hot_loop(ins):
    """(static count without NOPs, longest backward-branch loop body count)."""
    real = [(a, t) for a, t in ins if not re.match(r"(@\S+\s+)?NOP\b", t)]
    best = 0
    for a, t in real:
        m = re.search(r"\bBRA\b.*?`?\(?\.L_x_\d+\)?|\bBRA\b\s+(0x[0-9a-f]+)", t)
        tgt = re.search(r"0x([0-9a-f]+)", t) if "BRA" in t else None
        if tgt:
            target = int(tgt.group(1), 16)
            if target < a:
                best = max(best, sum(1 for b, u in real if target <= b <= a and not u.startswith("EXIT")))
    return len(real), best


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
                total, loop = hot_loop(ins)
                print(f"{d[:150]}\n    {usage.get(name, '?')}; {total} instructions, hot loop {loop}")


if __name__ == "__main__":
    main()
