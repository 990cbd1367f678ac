"""The CPU emulator of the CUDA execution model (tests/emulation/cuda) on small hand-written kernels: each
behaviour of the model, and each error a GPU would hide, is checked on a kernel written to show it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emulation.cuda import emulator as emu

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no C++ compiler (g++) for the CUDA emulator")

SCHEDULES = emu.SCHEDULES

KERNELS = r"""
extern "C" __global__ void copy(float* out, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i];
}
// reads one element past the end when n is not a multiple of the block: a missing bounds check
extern "C" __global__ void copy_unchecked(float* out, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = x[i];
}
extern "C" __global__ void load_float4_at(float* out, const float* x, int offset) {
    float4 v = reinterpret_cast<const float4*>(x + offset)[0];
    out[threadIdx.x] = v.x;
}
// each thread reads its right neighbour's value through shared memory: needs the barrier
extern "C" __global__ void rotate(float* out, const float* x, int with_barrier) {
    __shared__ float s[64];
    int t = threadIdx.x;
    s[t] = x[t];
    if (with_barrier) __syncthreads();
    out[t] = s[(t + 1) % blockDim.x];
}
extern "C" __global__ void read_shared_unwritten(float* out) {
    __shared__ float s[32];
    extern __shared__ float dyn[];
    out[threadIdx.x] = s[threadIdx.x] + dyn[threadIdx.x];
}
extern "C" __global__ void shared_out_of_bounds(float* out) {
    __shared__ float s[32];
    s[threadIdx.x] = 1.0f;                  // launched with 64 threads
    out[threadIdx.x] = 0.0f;
}
extern "C" __global__ void early_exit_then_barrier(float* out) {
    if (threadIdx.x >= 40) return;           // these threads never reach the barrier
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void divergent_barriers(float* out) {
    if (threadIdx.x % 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void warp_sum(float* out, const float* x, int off0) {
    float v = x[threadIdx.x];
    for (int off = off0; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    out[threadIdx.x] = v;
}
extern "C" __global__ void shuffle_after_exit(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 1);
}
extern "C" __global__ void shuffle_vs_barrier(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);   // lanes 1..31 never come
    __syncthreads();
    out[threadIdx.x] = v;
}
extern "C" __global__ void broadcast(float* out, const float* x) {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, x[threadIdx.x], 5);
}
extern "C" __global__ void scale_denormal(float* out, const float* x, float one) {
    out[threadIdx.x] = x[threadIdx.x] * one;
}
extern "C" __global__ void types(float* f, long long* l, unsigned short* h, int i, long long n, float s) {
    f[0] = s; l[0] = n; h[0] = (unsigned short)i;
}
__device__ int deep(int n) {
    volatile char pad[8192];
    pad[n % 8192] = (char)n;
    return n == 0 ? 0 : deep(n - 1) + pad[0];
}
extern "C" __global__ void recurse(int* out, int n) {
    out[threadIdx.x] = deep(n);
}
extern "C" __global__ void wild_local_pointer(int* out) {
    int a[4] = {1, 2, 3, 4};
    const int* p = a + (1LL << 40);
    out[0] = *p;
}
extern "C" __global__ void block_total(float* out, const float* x) {
    __shared__ float total;
    __shared__ int count, unused;
    if (threadIdx.x == 0) { total = 0.0f; count = 0; }
    __syncthreads();
    for (int t = 0; t < blockDim.x; t++) {   // one thread at a time adds its value (no atomics needed)
        if (t == threadIdx.x) { total += x[t]; count++; }
        __syncthreads();
    }
    out[threadIdx.x] = total / count;
}
extern "C" __global__ void votes(unsigned* out, const int* pred) {
    int p = pred[threadIdx.x];
    unsigned b = __ballot_sync(0xffffffffu, p);
    int any = __any_sync(0xffffffffu, p), all = __all_sync(0xffffffffu, p);
    if (threadIdx.x < 16) __syncwarp(0x0000ffffu);     // half the warp meets; the other half need not come
    out[threadIdx.x] = b;
    out[32 + threadIdx.x] = any + 2 * all;
}
extern "C" __global__ void histogram(int* bins, const int* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(&bins[x[i]], 1);
}
extern "C" __global__ void who(int* out) {
    int b = blockIdx.x + gridDim.x * blockIdx.y;
    int t = threadIdx.x + blockDim.x * threadIdx.y;
    out[b * blockDim.x * blockDim.y + t] = b * 1000 + t;
}
"""

PTX = r"""
extern "C" __global__ void cvt(unsigned* out, const float* hi, const float* lo, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned r;
    float a = hi[i], b = lo[i];
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(a), "f"(b));
    out[i] = r;
}
// one warp: lane l passes registers regs[l*10 .. l*10+9] = a0..a3, b0, b1, c0..c3 (floats as bits)
extern "C" __global__ void mma(unsigned* d, const unsigned* regs) {
    const unsigned* r = regs + threadIdx.x * 10;
    float c[4];
    for (int e = 0; e < 4; e++) c[e] = __uint_as_float(r[6 + e]);
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]), "r"(r[4]), "r"(r[5]));
    for (int e = 0; e < 4; e++) d[threadIdx.x * 4 + e] = __float_as_uint(c[e]);
}
// one warp: src (n bf16) is copied into a shared tile; lane l gives the row address tile + offs[l] (in elements,
// so that a test can misalign it) to ldmatrix .x4 (trans = 0) or .x4.trans (trans = 1); out[4l + i] = register i
extern "C" __global__ void ldsm(unsigned* out, const unsigned short* src, const int* offs, int n, int trans) {
    __shared__ __align__(16) unsigned short tile[16 * 72];
    for (int i = threadIdx.x; i < n; i += blockDim.x) tile[i] = src[i];
    __syncthreads();
    unsigned a = (unsigned)__cvta_generic_to_shared(tile + offs[threadIdx.x]);
    unsigned r0, r1, r2, r3;
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
    out[4 * threadIdx.x] = r0; out[4 * threadIdx.x + 1] = r1; out[4 * threadIdx.x + 2] = r2; out[4 * threadIdx.x + 3] = r3;
}
// a global pointer where ldmatrix wants a shared one
extern "C" __global__ void ldsm_global(unsigned* out, const unsigned short* src) {
    unsigned a = (unsigned)__cvta_generic_to_shared(src), r0, r1, r2, r3;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
    out[threadIdx.x] = r0 + r1 + r2 + r3;
}
// cp.async: thread t copies src[8t .. 8t+7] (src_size bytes of it, the rest zeros) into a[8t ..] (group 0) and
// src[8(n+t) ..] into b[8t ..] (group 1), then records what shared memory holds at each step, n = blockDim.x:
// seen[0]: a (first set to 7 by the thread) before any wait, seen[1]: a after wait_group 1, seen[2]: b after wait_group 1,
// seen[3]: b after wait_all, seen[4]: the next thread's a after a barrier (mode 1: with no barrier).
// mode 2: the thread exits with its group 1 copy never waited for.
extern "C" __global__ void cpasync(unsigned short* seen, const unsigned short* src, int src_size, int mode) {
    __shared__ __align__(16) unsigned short a[8 * 64], b[8 * 64];
    int t = threadIdx.x, n = blockDim.x;
    for (int i = 0; i < 8; i++) a[8 * t + i] = 7;       // the old contents: undefined from the issue on
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(a + 8 * t)), "l"(src + 8 * t), "r"(src_size) : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(b + 8 * t)), "l"(src + 8 * (n + t)), "r"(16) : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    unsigned short* out = seen + 8 * t;
    for (int i = 0; i < 8; i++) out[i] = a[8 * t + i];
    asm volatile("cp.async.wait_group %0;\n" :: "n"(1) : "memory");
    for (int i = 0; i < 8; i++) out[8 * n + i] = a[8 * t + i];
    for (int i = 0; i < 8; i++) out[16 * n + i] = b[8 * t + i];
    if (mode == 2) return;
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    for (int i = 0; i < 8; i++) out[24 * n + i] = b[8 * t + i];
    if (mode == 0) __syncthreads();
    for (int i = 0; i < 8; i++) out[32 * n + i] = a[8 * ((t + 1) % n) + i];
}
"""


@pytest.fixture(scope="module")
def k():
    return emu.load("test_kernels", KERNELS)


@pytest.fixture(scope="module")
def ptx():
    return emu.load("test_ptx", PTX)


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("n", [1, 255, 256, 1000])
def test_grid_covers_every_element(k, schedule, n):
    x, out = f32(n), np.full(n, np.nan, np.float32)
    k.launch("copy", ((n + 255) // 256,), (256,), (out, x, np.int32(n)), schedule=schedule)
    np.testing.assert_array_equal(out, x)


def test_builtin_variables_in_2d(k):
    out = np.full(6 * 12, -1, np.int32)
    k.launch("who", (3, 2), (4, 3), (out,))
    b, t = np.divmod(np.arange(72), 12)
    np.testing.assert_array_equal(out, b * 1000 + t)


def test_out_of_bounds_read_names_kernel_and_argument(k):
    x, out = f32(300), np.zeros(512, np.float32)
    with pytest.raises(emu.EmulatorError, match=r"copy_unchecked.*out-of-bounds.*\(element 300\) of argument 'x'"):
        k.launch("copy_unchecked", (2,), (256,), (out, x, np.int32(300)), schedule="inorder")


def test_views_are_bounded_by_their_allocation(k):
    """A view passes its own pointer, but the allocation it lives in bounds the accesses (as on a GPU)."""
    base = f32(10)
    out = np.zeros(8, np.float32)
    k.launch("copy_unchecked", (1,), (8,), (out, base[2:], np.int32(8)))        # inside the allocation
    np.testing.assert_array_equal(out, base[2:])
    with pytest.raises(emu.EmulatorError, match="out-of-bounds"):
        k.launch("copy_unchecked", (1,), (9,), (np.zeros(9, np.float32), base[2:], np.int32(9)))


def test_misaligned_vector_load(k):
    x, out = f32(16), np.zeros(1, np.float32)
    k.launch("load_float4_at", (1,), (1,), (out, x, np.int32(4)))
    assert out[0] == x[4]
    with pytest.raises(emu.EmulatorError, match="misaligned.*16-byte alignment"):
        k.launch("load_float4_at", (1,), (1,), (out, x, np.int32(1)))


def test_missing_barrier_changes_the_result_with_the_schedule(k):
    x = f32(64)
    want = np.roll(x, -1)
    results = {}
    for s in SCHEDULES:
        out = np.zeros(64, np.float32)
        k.launch("rotate", (1,), (64,), (out, x, np.int32(1)), schedule=s)
        np.testing.assert_array_equal(out, want)                # with the barrier: right in every order
        k.launch("rotate", (1,), (64,), (out, x, np.int32(0)), schedule=s)
        results[s] = out.copy()
    wrong = [s for s, r in results.items() if not np.array_equal(r, want)]
    assert "inorder" in wrong                                   # thread t reads s[t+1] before thread t+1 wrote it
    assert np.isnan(results["inorder"]).any()                   # ...and gets the poison (NaN)


def test_shared_memory_starts_as_nan(k):
    out = np.zeros(32, np.float32)
    k.launch("read_shared_unwritten", (2,), (32,), (out,), shared_mem=128)
    assert np.isnan(out).all()


def test_shared_scalars(k):
    x, out = f32(48), np.zeros(48, np.float32)
    k.launch("block_total", (1,), (48,), (out, x))
    np.testing.assert_allclose(out, np.full(48, x.astype(np.float64).mean()), rtol=1e-5)


def test_shared_array_index_checked(k):
    with pytest.raises(emu.EmulatorError, match=r"out-of-bounds index 32 of __shared__ s\[32\]"):
        k.launch("shared_out_of_bounds", (1,), (64,), (np.zeros(64, np.float32),))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barrier_that_exited_threads_never_reach(k, schedule):
    with pytest.raises(emu.EmulatorError, match="exit"):
        k.launch("early_exit_then_barrier", (1,), (64,), (np.zeros(64, np.float32),), schedule=schedule)


def test_threads_at_different_barriers(k):
    with pytest.raises(emu.EmulatorError, match="different __syncthreads"):
        k.launch("divergent_barriers", (1,), (64,), (np.zeros(64, np.float32),))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warp_butterfly_sum(k, schedule):
    x = f32(64)
    out = np.zeros(64, np.float32)
    k.launch("warp_sum", (1,), (64,), (out, x, np.int32(16)), schedule=schedule)
    want = np.repeat(x.reshape(2, 32).astype(np.float64).sum(1), 32)
    np.testing.assert_allclose(out, want, rtol=1e-5)
    k.launch("warp_sum", (1,), (64,), (out, x, np.int32(8)), schedule=schedule)      # a wrong first offset
    assert not np.allclose(out, want, rtol=1e-3)


def test_shuffle_source_lane(k):
    x, out = f32(32), np.zeros(32, np.float32)
    k.launch("broadcast", (1,), (32,), (out, x))
    np.testing.assert_array_equal(out, np.full(32, x[5]))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shuffle_with_an_exited_lane(k, schedule):
    with pytest.raises(emu.EmulatorError, match="exit"):
        k.launch("shuffle_after_exit", (1,), (32,), (np.zeros(32, np.float32),), schedule=schedule)


def test_deadlock_is_reported(k):
    with pytest.raises(emu.EmulatorError, match="deadlock.*__shfl_xor_sync.*__syncthreads|deadlock"):
        k.launch("shuffle_vs_barrier", (1,), (32,), (np.zeros(32, np.float32),))


@pytest.mark.parametrize("pattern", ["mixed", "all", "none"])
def test_warp_votes(k, pattern):
    pred = {"mixed": np.arange(32) % 3 == 0, "all": np.ones(32, bool), "none": np.zeros(32, bool)}[pattern]
    out = np.zeros(64, np.uint32)
    k.launch("votes", (1,), (32,), (out, pred.astype(np.int32)))
    bits = int(sum(1 << i for i in range(32) if pred[i]))
    assert (out[:32] == bits).all()
    assert (out[32:] == int(pred.any()) + 2 * int(pred.all())).all()


def test_atomic_add(k):
    x = np.random.default_rng(4).integers(0, 10, size=1000).astype(np.int32)
    bins = np.zeros(10, np.int32)
    k.launch("histogram", (4,), (256,), (bins, x, np.int32(1000)))
    np.testing.assert_array_equal(bins, np.bincount(x, minlength=10))


def test_denormals_flushed_like_ftz(k):
    x = np.array([1e-40, -1e-40, 1e-30], np.float32)
    out = np.full(3, np.nan, np.float32)
    k.launch("scale_denormal", (1,), (3,), (out, x, np.float32(1)))
    assert out[0] == 0 and out[1] == 0 and out[2] == x[2]


@pytest.mark.parametrize("grid,block,smem,match", [
    ((1,), (1025,), 0, "bad block"), ((1,), (32, 1, 65), 0, "bad block"), ((1, 65536), (32,), 0, "bad grid"),
    ((0,), (32,), 0, "bad grid"), ((1,), (32,), 48 * 1024 + 4, "48 KB")])
def test_launch_limits(k, grid, block, smem, match):
    with pytest.raises(emu.EmulatorError, match=match):
        k.launch("read_shared_unwritten", grid, block, (np.zeros(2048, np.float32),), shared_mem=smem)


def test_arguments_checked_like_cupy_passes_them(k):
    f, l, h = np.zeros(1, np.float32), np.zeros(1, np.int64), np.zeros(1, np.uint16)
    k.launch("types", (1,), (1,), (f, l, h, np.int32(7), np.int64(2 ** 40 + 3), np.float32(1.5)))
    assert f[0] == 1.5 and l[0] == 2 ** 40 + 3 and h[0] == 7
    bad = [((f, l, h, 7, np.int64(1), np.float32(1)), "pass int32"),              # a Python int
           ((f, l, h, np.int64(7), np.int64(1), np.float32(1)), "pass int32"),
           ((f, l, h, np.int32(7), np.int32(1), np.float32(1)), "pass int64"),
           ((f, l, h, np.int32(7), np.int64(1), 1.0), "pass float32"),            # a Python float (double)
           ((f, l.astype(np.int32), h, np.int32(7), np.int64(1), np.float32(1)), "dtype int32, the kernel reads int64"),
           ((f.astype(np.float64), l, h, np.int32(7), np.int64(1), np.float32(1)), "dtype float64"),
           ((f, l, h, np.int32(7), np.int64(1)), "5 arguments for 6 parameters")]
    for args, match in bad:
        with pytest.raises(emu.EmulatorError, match=match):
            k.launch("types", (1,), (1,), args)


def test_stack_overflow_is_an_error_not_a_crash(k):
    out = np.zeros(4, np.int32)
    k.launch("recurse", (1,), (4,), (out, np.int32(2)))                   # shallow: fine
    with pytest.raises(emu.EmulatorError, match="stack overflow"):
        k.launch("recurse", (1,), (4,), (out, np.int32(100)))
    k.launch("recurse", (1,), (4,), (out, np.int32(2)))                   # and the emulator still works


def test_wild_local_pointer_is_an_error_not_a_crash(k):
    with pytest.raises(emu.EmulatorError, match="segmentation fault|bus error"):
        k.launch("wild_local_pointer", (1,), (1,), (np.zeros(1, np.int32),))


def test_launch_bounds_are_a_launch_limit():
    src = 'extern "C" __global__ void __launch_bounds__(64) k(float* o) { o[threadIdx.x] = 1.0f; }'
    mod = emu.load("test_launch_bounds", src)
    mod.launch("k", (1,), (64,), (np.zeros(64, np.float32),))
    with pytest.raises(emu.EmulatorError, match=r"__launch_bounds__\(64\)"):
        mod.launch("k", (1,), (65,), (np.zeros(65, np.float32),))


def test_null_pointer_dereference(k):
    with pytest.raises(emu.EmulatorError, match="null pointer"):
        k.launch("copy", (1,), (4,), (emu.NULL, f32(4), np.int32(4)))


def test_trace_prints_what_each_thread_does(k, capfd):
    k.launch("rotate", (1,), (2,), (np.zeros(2, np.float32), f32(2), np.int32(1)), schedule="inorder", trace=True)
    lines = capfd.readouterr().out.splitlines()
    line = KERNELS.splitlines().index("    if (with_barrier) __syncthreads();") + 1     # line numbers of the .cu
    assert lines[:2] == [f"[block (0,0,0) thread (0,0,0)] __syncthreads (line {line})",
                         f"[block (0,0,0) thread (1,0,0)] __syncthreads (line {line})"]
    assert sum("exit" in s for s in lines) == 2


# ------------------------------------------------------------------------------------------ the PTX models

def _bf16_bits(x):
    """Round-to-nearest-even float32 -> bf16 bits, NaN -> 0x7FFF (the hardware's canonical NaN)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FFF), r)


def test_cvt_rn_bf16x2(ptx):
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.4e38, 1e-40],
                       np.float32)
    nan_payload = np.array([0x7F800001, 0xFFC12345], np.uint32).view(np.float32)
    hi = np.concatenate([special, nan_payload, f32(1000, seed=1)])
    lo = np.concatenate([special[::-1], nan_payload[::-1], f32(1000, seed=2)])
    out = np.zeros(hi.size, np.uint32)
    ptx.launch("cvt", ((hi.size + 127) // 128,), (128,), (out, hi, lo, np.int32(hi.size)))
    np.testing.assert_array_equal(out >> 16, _bf16_bits(hi))
    np.testing.assert_array_equal(out & 0xFFFF, _bf16_bits(lo))
    assert out[0] >> 16 == 0 and (out[1] >> 16) == 0x8000                      # signed zeros
    assert (out[5] >> 16) == 0x3F80 and (out[6] >> 16) == 0x3F82              # ties to even


def test_mma_m16n8k16_fragment_layout(ptx):
    """The model against the PTX ISA's fragment layout, restated here independently in NumPy."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((16, 16)).astype(np.float32)
    B = rng.standard_normal((16, 8)).astype(np.float32)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    Ab, Bb = _bf16_bits(A), _bf16_bits(B)
    regs = np.zeros((32, 10), np.uint32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        pair = lambda lo_, hi_: np.uint32(lo_) | (np.uint32(hi_) << np.uint32(16))
        regs[lane, 0] = pair(Ab[g, 2 * t], Ab[g, 2 * t + 1])
        regs[lane, 1] = pair(Ab[g + 8, 2 * t], Ab[g + 8, 2 * t + 1])
        regs[lane, 2] = pair(Ab[g, 2 * t + 8], Ab[g, 2 * t + 9])
        regs[lane, 3] = pair(Ab[g + 8, 2 * t + 8], Ab[g + 8, 2 * t + 9])
        regs[lane, 4] = pair(Bb[2 * t, g], Bb[2 * t + 1, g])
        regs[lane, 5] = pair(Bb[2 * t + 8, g], Bb[2 * t + 9, g])
        regs[lane, 6:10] = np.array([C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]],
                                    np.float32).view(np.uint32)
    d = np.zeros(32 * 4, np.uint32)
    ptx.launch("mma", (1,), (32,), (d, regs.reshape(-1)))
    D = np.zeros((16, 8), np.float32)
    dv = d.view(np.float32).reshape(32, 4)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1] = dv[lane]
    to_f = lambda b: (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    want = to_f(Ab) @ to_f(Bb) + C
    np.testing.assert_allclose(D, want, rtol=1e-6, atol=1e-6)


def test_mma_needs_the_whole_warp(ptx):
    with pytest.raises(emu.EmulatorError, match="mask .* names lane|deadlock|exit"):
        ptx.launch("mma", (1,), (16,), (np.zeros(64, np.uint32), np.zeros(320, np.uint32)))


def _ldmatrix_statement(tile, offs, trans):
    """The PTX ISA's ldmatrix .x4 layout, restated in NumPy: matrix i's row r is the 8 elements at lane 8i + r's
    address; lane l (g = l // 4, t = l % 4) gets in register i the pair (row g, columns 2t, 2t+1) of matrix i,
    or with .trans the pair (rows 2t, 2t+1, column g); the first element in the low 16 bits."""
    mats = np.stack([np.stack([tile[o:o + 8] for o in offs[8 * i:8 * i + 8]]) for i in range(4)])   # (4, 8, 8)
    want = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            lo, hi = (mats[i, 2 * t, g], mats[i, 2 * t + 1, g]) if trans else (mats[i, g, 2 * t], mats[i, g, 2 * t + 1])
            want[lane, i] = np.uint32(lo) | (np.uint32(hi) << np.uint32(16))
    return want


@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_x4_fragment_layout(ptx, trans):
    """Every lane gives the address of one row anywhere in the tile (16-byte aligned, rows shuffled, one row
    repeated); each register of each lane must match the NumPy statement of the layout, and not the other
    variant's (a negative control: the two statements differ on these values)."""
    rng = np.random.default_rng(11 + trans)
    tile = rng.integers(0, 2 ** 16, 16 * 72, dtype=np.uint16)
    offs = (rng.permutation(16 * 72 // 8)[:32] * 8).astype(np.int32)
    offs[5] = offs[20]                                   # two lanes may name the same row
    out = np.zeros(32 * 4, np.uint32)
    ptx.launch("ldsm", (1,), (32,), (out, tile, offs, np.int32(tile.size), np.int32(trans)))
    got = out.reshape(32, 4)
    np.testing.assert_array_equal(got, _ldmatrix_statement(tile, offs, trans))
    assert (got != _ldmatrix_statement(tile, offs, 1 - trans)).any()


def test_ldmatrix_rows_of_a_padded_tile_are_an_mma_b_fragment(ptx):
    """ldmatrix .x4 at rows n0 + lane % 8, columns 8 * (lane // 8) of a row-major Bt (stride 72, as the flash
    kernels' tiles) gives each lane the mma B fragments b0, b1 of two 16-wide k chunks: Bt[g][2t..], Bt[g][2t+8..]."""
    rng = np.random.default_rng(2)
    tile = rng.integers(0, 2 ** 16, 16 * 72, dtype=np.uint16)
    Bt = tile.reshape(16, 72)
    offs = np.array([(lane % 8) * 72 + 8 * (lane // 8) for lane in range(32)], np.int32)
    out = np.zeros(32 * 4, np.uint32)
    ptx.launch("ldsm", (1,), (32,), (out, tile, offs, np.int32(tile.size), np.int32(0)))
    got = out.reshape(32, 4)
    pair = lambda a, b: np.uint32(a) | (np.uint32(b) << np.uint32(16))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for kc in range(2):
            assert got[lane, 2 * kc] == pair(Bt[g, 16 * kc + 2 * t], Bt[g, 16 * kc + 2 * t + 1])
            assert got[lane, 2 * kc + 1] == pair(Bt[g, 16 * kc + 2 * t + 8], Bt[g, 16 * kc + 2 * t + 9])


@pytest.mark.parametrize("bad,match", [(4, "not 16-byte aligned"), (16 * 72 - 4, "not 16-byte aligned"),
                                       (16 * 72 - 8 + 16, "run past its end|in no __shared__")])
def test_ldmatrix_row_addresses_checked(ptx, bad, match):
    tile = np.zeros(16 * 72, np.uint16)
    offs = np.arange(32, dtype=np.int32) * 8
    offs[9] = bad
    with pytest.raises(emu.EmulatorError, match=match):
        ptx.launch("ldsm", (1,), (32,), (np.zeros(128, np.uint32), tile, offs, np.int32(tile.size), np.int32(0)))


def test_ldmatrix_needs_the_whole_warp_and_shared_memory(ptx):
    tile = np.zeros(16 * 72, np.uint16)
    with pytest.raises(emu.EmulatorError, match="mask .* names lane|deadlock|exit"):
        ptx.launch("ldsm", (1,), (16,), (np.zeros(128, np.uint32), tile, np.arange(32, dtype=np.int32) * 8,
                                         np.int32(tile.size), np.int32(0)))
    with pytest.raises(emu.EmulatorError, match="not in shared memory"):
        ptx.launch("ldsm_global", (1,), (32,), (np.zeros(32, np.uint32), tile))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cp_async_lands_at_the_wait_that_covers_its_group(ptx, schedule):
    n = 64
    src = np.random.default_rng(4).integers(0, 2 ** 15, 16 * n, dtype=np.uint16)
    seen = np.zeros((5, n, 8), np.uint16)
    ptx.launch("cpasync", (1,), (n,), (seen, src, np.int32(10), np.int32(0)), schedule=schedule)
    a = src[:8 * n].reshape(n, 8).copy()
    a[:, 5:] = 0                                         # src_size 10 bytes: 5 elements read, 3 zeros
    b = src[8 * n:].reshape(n, 8)
    assert (seen[0] == 0xFFFF).all()                     # nothing waited for: undefined (NaN) until the wait
    np.testing.assert_array_equal(seen[1], a)            # wait_group 1: the older group (a) has landed ...
    assert (seen[2] == 0xFFFF).all()                     # ... the newest (b) may still be in flight
    np.testing.assert_array_equal(seen[3], b)            # wait_all
    np.testing.assert_array_equal(seen[4], np.roll(a, -1, axis=0))   # another thread's copy, after a barrier


def test_cp_async_copy_of_another_thread_needs_a_barrier(ptx):
    n = 64
    src = np.random.default_rng(4).integers(0, 2 ** 15, 16 * n, dtype=np.uint16)
    seen = np.zeros((5, n, 8), np.uint16)
    ptx.launch("cpasync", (1,), (n,), (seen, src, np.int32(16), np.int32(1)), schedule="inorder")
    assert (seen[4][:-1] == 0xFFFF).all()               # thread t ran before t+1 issued its copy: poison


def test_cp_async_never_waited_for_is_an_error(ptx):
    with pytest.raises(emu.EmulatorError, match="never waited for"):
        ptx.launch("cpasync", (1,), (32,), (np.zeros(5 * 32 * 8, np.uint16), np.zeros(16 * 32, np.uint16),
                                            np.int32(16), np.int32(2)))


def test_cp_async_checks_its_addresses(ptx):
    with pytest.raises(emu.EmulatorError, match="source bytes|out-of-bounds"):
        ptx.launch("cpasync", (1,), (32,), (np.zeros(5 * 32 * 8, np.uint16), np.zeros(16 * 32 - 8, np.uint16),
                                            np.int32(16), np.int32(0)))


def test_unknown_ptx_instruction_does_not_compile():
    src = 'extern "C" __global__ void k(unsigned* o) { unsigned r; asm("prmt.b32 %0, %1, %2, %3;" ' \
          ': "=r"(r) : "r"(1u), "r"(2u), "r"(3u)); o[0] = r; }'
    with pytest.raises(emu.EmulatorError, match="prmt_b32"):
        emu.load("test_unknown_ptx", src)


def test_kernels_readme_example_runs():
    """The learners' example in nanogpt_np/kernels/README.md runs as written, from the repository root."""
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "nanogpt_np" / "kernels" / "README.md").read_text()
    section = text[text.index("## Running a kernel on the CPU"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "row 1 lane 4: my sum 9, row mean 7" in proc.stdout and "[2. 7.]" in proc.stdout
    assert "[block (0,0,0) thread (0,0,0)] __shfl_xor_sync" in proc.stdout
