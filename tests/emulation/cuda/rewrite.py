"""Turn a kernel source (.cu) into C++ that g++ compiles against cuda_emu.h. Mechanical text rewrites only;
the kernels' statements stay as they are:

  extern "C" __global__ void k(...)   ->  static void k(...)  plus an `extern "C" int emu_launch_k(...)` entry
  __launch_bounds__(n)                ->  removed
  float* p, (const float4*)x, ...     ->  emu::ptr<float> p, (emu::ptr<const float4>)x  (checked pointers)
  reinterpret_cast<const float4*>(x)  ->  emu::ptr_cast<emu::ptr<const float4>>(x)
  __shared__ float a[32], b[32];      ->  auto& a = emu::shared_var<float[32]>(0, "a"); auto& b = ...(1, "b");
  extern __shared__ float smem[];     ->  emu::ptr<float> smem = emu::dynamic_shared<float>();
  asm("op.x %0, %1;" : "=r"(d) : "f"(a));  ->  emu::ptx::op_x(__LINE__, d, a);

`#line` directives keep g++'s messages and the emulator's line numbers pointing at the original .cu lines.
kernel_signatures() reads the kernels' parameter lists for the argument checks in emulator.py.
"""
import re
from dataclasses import dataclass

# scalar and vector types a pointer can point to, longest spelling first
_BASE = r"(?:unsigned\s+long\s+long|unsigned\s+short|unsigned\s+int|unsigned\s+char|long\s+long|unsigned|" \
        r"float[24]|uint4|bf16_t|float|int|short|char|double|void)"
_PTR = re.compile(r"\b((?:const\s+)?" + _BASE + r")\s*\*")
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\(([^)]*)\)\s*)?(\w+)\s*\(')


@dataclass
class Param:
    name: str
    ctype: str          # e.g. "const float*", "int", "long long"
    pointer: bool

    @property
    def base(self):
        """The pointed-to type without const ("float" for "const float*")."""
        return re.sub(r"\bconst\b", "", self.ctype.rstrip("*")).strip()


def _strip_comments(src):
    """Comments replaced by spaces (newlines kept, so line numbers do not move)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r"//[^\n]*|/\*.*?\*/", blank, src, flags=re.S)


def _matching(text, i, open_="(", close=")"):
    """Index of the bracket closing the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {open_} at offset {i}")


def _split_top(text, sep=","):
    """Split on `sep` outside brackets."""
    out, depth, start = [], 0, 0
    for j, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append(text[start:j])
            start = j + 1
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def launch_bounds(src):
    """{kernel name: the most threads per block its __launch_bounds__ allows} (kernels that declare one)."""
    src = _strip_comments(src)
    return {m.group(2): int(_split_top(m.group(1))[0]) for m in _KERNEL.finditer(src) if m.group(1)}


def kernel_signatures(src):
    """{kernel name: [Param, ...]} for every extern "C" __global__ function, in source order."""
    src = _strip_comments(src)
    typedefs = dict((b, a) for a, b in re.findall(r"typedef\s+([\w\s]+?)\s+(\w+)\s*;", src))
    out = {}
    for m in _KERNEL.finditer(src):
        close = _matching(src, m.end() - 1)
        params = []
        for p in _split_top(src[m.end():close]):
            p = re.sub(r"\b__restrict__\b", "", p)
            name = re.findall(r"\w+", p)[-1]
            ctype = " ".join(p[:p.rfind(name)].replace("*", " * ").split()).replace(" *", "*")
            for alias, real in typedefs.items():
                ctype = re.sub(rf"\b{alias}\b", real, ctype)
            params.append(Param(name, ctype, ctype.endswith("*")))
        out[m.group(2)] = params
    return out


# ------------------------------------------------------------------------------------------------ rewrites

def _rewrite_asm(src):
    """asm("tmpl" : outputs : inputs) statements -> calls of the C++ models in ptx_models.h."""
    out, pos = [], 0
    for m in re.finditer(r"\basm\s*(?:volatile\s*)?\(", src):
        if m.start() < pos:
            continue
        close = _matching(src, m.end() - 1)
        body = src[m.end():close]
        parts = body.split(":")                  # template : outputs : inputs [: clobbers]
        template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', parts[0])).replace("\\n", " ").replace("\\t", " ")
        operands = []
        for section in parts[1:3]:
            for op in _split_top(section):
                operands.append(op[op.index("(") + 1:op.rindex(")")].strip())
        opcode = template.split()[0].rstrip(";")          # "cp.async.commit_group;" has no operands
        refs = [int(r) for r in re.findall(r"%(\d+)", template)]
        fn = re.sub(r"[^\w]", "_", opcode)
        args = "".join(", " + operands[r] for r in refs)      # none: cp.async.commit_group;
        lines = body.count("\n")
        out.append(src[pos:m.start()])
        out.append(f"emu::ptx::{fn}(__LINE__{args})" + "\n" * lines)
        pos = close + 1
    out.append(src[pos:])
    return "".join(out)


def _rewrite_shared(src):
    """__shared__ declarations -> slots in the per-block arena (numbered in source order)."""
    counter = [0]

    def dynamic(m):
        return f"emu::ptr<{m.group(1).strip()}> {m.group(2)} = emu::dynamic_shared<{m.group(1).strip()}>();"

    src = re.sub(r"extern\s+__shared__\s+(?:__align__\s*\(\d+\)\s*)?([\w\s]+?)\s+(\w+)\s*\[\s*\]\s*;", dynamic, src)

    def static(m):
        typ, decls = m.group(1).strip(), m.group(2)
        stmts = []
        for d in _split_top(decls):
            name = re.match(r"\w+", d).group(0)
            dims = d[len(name):].strip()
            stmts.append(f'auto& {name} = emu::shared_var<{typ}{dims}>({counter[0]}, "{name}");')
            counter[0] += 1
        return " ".join(stmts)

    src = re.sub(r"__shared__\s+(?:__align__\s*\(\d+\)\s*)?([\w\s]+?)\s+(\w+\s*\[[^;]*)\s*;", static, src)

    def scalar(m):                               # __shared__ float total;  (no array)
        stmts = []
        for name in _split_top(m.group(2)):
            stmts.append(f'auto& {name} = emu::shared_scalar<{m.group(1).strip()}>({counter[0]}, "{name}");')
            counter[0] += 1
        return " ".join(stmts)

    return re.sub(r"__shared__\s+(?:__align__\s*\(\d+\)\s*)?([\w\s]+?)\s+(\w+(?:\s*,\s*\w+)*)\s*;", scalar, src)


def _rewrite_pointers(src):
    src = re.sub(r"reinterpret_cast\s*<\s*((?:const\s+)?" + _BASE + r")\s*\*\s*>",
                 lambda m: f"emu::ptr_cast<emu::ptr<{' '.join(m.group(1).split())}>>", src)
    return _PTR.sub(lambda m: f"emu::ptr<{' '.join(m.group(1).split())}> ", src)


def _rewrite_kernels(src):
    src = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", src)
    return re.sub(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', r"static void \1(", src)


def _entries(signatures, bounds):
    """One `extern "C"` entry per kernel: unpack the Arg array into the kernel's parameters and run the grid
    (a block larger than the kernel's __launch_bounds__ fails to launch, as on the GPU)."""
    out = []
    for name, params in signatures.items():
        args = []
        for i, p in enumerate(params):
            t = f"emu::ptr<{p.ctype[:-1].strip()}>" if p.pointer else p.ctype
            args.append(f"emu::arg<{t}>(a, {i})")
        out.append(f'extern "C" int emu_launch_{name}(const emu::Launch* L, const emu::Arg* a) {{\n'
                   f"    return emu::run(L, {bounds.get(name, 1024)}, [a] {{ {name}({', '.join(args)}); }});\n}}\n")
    return "\n".join(out)


def to_cpp(src, filename="kernel.cu"):
    """The whole rewrite: .cu text -> C++ text (includes cuda_emu.h, which must be on the include path)."""
    signatures, bounds = kernel_signatures(src), launch_bounds(src)
    body = _strip_comments(src)
    body = _rewrite_asm(body)
    body = _rewrite_shared(body)
    body = _rewrite_kernels(body)
    body = _rewrite_pointers(body)
    body = body.replace("#pragma unroll", "")
    return (f'#include "cuda_emu.h"\n#line 1 "{filename}"\n{body}\n#line 100000 "{filename} (emulator entries)"\n'
            + _entries(signatures, bounds))
