"""Read the .cu sources beside this file and compile them: at run time with CuPy, or offline with nvcc.

Run time (GPU): `module(name)` compiles `<name>.cu` once per process with CuPy's RawModule (NVRTC) and caches
it; CuPy also keeps the compiled binary in its on-disk cache (~/.cupy/kernel_cache), so a second process does
not recompile. CuPy adds `-arch` for the current device itself, so we pass only language options.

Offline (CPU, CI): `nvcc_report(path, arch)` compiles a source to a cubin with `nvcc -cubin -arch=sm_XX -Xptxas -v`
and parses ptxas's resource report: registers, spill stores/loads, stack and shared memory per kernel. The
compile-check test and `python -m nanogpt_np.kernels.compile` (prints a table) use it.
"""
import os
import re
import shutil
import subprocess
import tempfile

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))

# every kernel source in the package, in the order the README describes them
SOURCES = ("encoder", "layernorm", "gelu", "cross_entropy", "adamw", "softmax_attention", "flash_attention", "bf16")

# No -std option: CuPy may add its own, and a second one would be rejected. The sources are plain C++11.
NVRTC_OPTIONS = ()
# flash_attention uses mma.sync with bf16 inputs (sm_80+); the other kernels need nothing beyond sm_60
MIN_ARCH = {"flash_attention": 80, "bf16": 80}

_modules = {}


def source_path(name: str) -> str:
    return os.path.join(KERNEL_DIR, name + ".cu")


def source(name: str) -> str:
    with open(source_path(name), encoding="utf-8") as f:
        return f.read()


def module(name: str):
    """The compiled cupy.RawModule for `<name>.cu` (compiled on first use, then cached in this process)."""
    mod = _modules.get(name)
    if mod is None:
        import cupy
        cc = int(cupy.cuda.Device().compute_capability)
        if cc < MIN_ARCH.get(name, 0):
            raise RuntimeError(f"kernel {name} needs compute capability >= {MIN_ARCH[name]}, this GPU has {cc}")
        mod = cupy.RawModule(code=source(name), options=NVRTC_OPTIONS)
        _modules[name] = mod
    return mod


def function(module_name: str, kernel_name: str):
    """A kernel function from a module; launch it as fn((grid,), (block,), args, shared_mem=...)."""
    key = (module_name, kernel_name)
    fn = _modules.get(key)
    if fn is None:
        fn = module(module_name).get_function(kernel_name)
        _modules[key] = fn
    return fn


# ----------------------------------------------------------------------------- offline compile check (nvcc)

def find_nvcc():
    """Path of nvcc, or None. Looks at $NVCC, PATH, $CUDA_HOME/bin and /usr/local/cuda/bin."""
    cands = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(report: str):
    """ptxas -v text -> {kernel: {registers, spill_stores, spill_loads, stack, smem}} (kernels only)."""
    out, current, props_of = {}, None, None
    for line in report.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            out[current] = {"registers": None, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0}
            continue
        m = _PROPS.search(line)
        if m:
            props_of = m.group(1)
            continue
        m = _STACK.search(line)
        if m and props_of in out:
            out[props_of].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m and current in out:
            out[current]["registers"] = int(m.group(1))
            if m.group(2):
                out[current]["smem"] = int(m.group(2))
    return out


def nvcc_report(name: str, arch: int, nvcc: str = None):
    """Compile `<name>.cu` for sm_<arch> with nvcc (no GPU needed) -> (per-kernel resources, full ptxas text).

    Raises RuntimeError with the compiler's output on any compile error.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, name + ".cubin")
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "--std=c++17", "-Xptxas", "-v", "-Werror", "all-warnings",
               "-o", cubin, source_path(name)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        text = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {name}.cu (sm_{arch}):\n{' '.join(cmd)}\n{text}")
    return parse_ptxas(text), text


def table(archs=(80, 90)):
    """Markdown table of registers / spills / shared memory for every kernel and arch."""
    rows = ["| source | kernel | arch | registers | spill st/ld (bytes) | stack | static smem |",
            "|---|---|---|---|---|---|---|"]
    for name in SOURCES:
        for arch in archs:
            if arch < MIN_ARCH.get(name, 0):
                continue
            res, _ = nvcc_report(name, arch)
            for k in sorted(res):
                r = res[k]
                rows.append(f"| {name}.cu | {k} | sm_{arch} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']}"
                            f" | {r['stack']} | {r['smem']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())


_sms = None


def device_array(x, dtype):
    """x (cupy or host numpy array) as a C-contiguous cupy array of `dtype` (no copy when it already is)."""
    import cupy
    return cupy.ascontiguousarray(cupy.asarray(x, dtype=dtype))


def num_sms() -> int:
    """Streaming multiprocessors on the current GPU (cached)."""
    global _sms
    if _sms is None:
        import cupy
        return int(cupy.cuda.Device().attributes["MultiProcessorCount"]) if emulator else _cache_sms(cupy)
    return _sms


def _cache_sms(cupy):
    global _sms
    _sms = int(cupy.cuda.Device().attributes["MultiProcessorCount"])
    return _sms


launches = 0          # kernels launched through launch(); benchmarks read it to count launches per step
emulator = None       # tests only: a callable(module, kernel, grid, block, args, shared_mem) run instead (fake_cupy)


def launch(module_name: str, kernel_name: str, grid, block, args, shared_mem: int = 0):
    """Launch one of our kernels on the current stream and count it."""
    global launches
    launches += 1
    if emulator is not None:
        return emulator(module_name, kernel_name, tuple(grid), tuple(block), tuple(args), shared_mem)
    function(module_name, kernel_name)(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)
