"""bf16 matmuls with a GELU epilogue (cuBLASLt): the MLP's GELU and its c_fc bias cost no pass of their own.

    gelu_gemm(x, w, b)            h = gelu(x @ w + b) and pre = x @ w + b, both bf16    (epilogue GELU_AUX_BIAS)
    dgelu_gemm(dy, w, pre, db)    dpre = (dy @ w.T) * gelu'(pre), bf16, and db = dpre summed over the rows,
                                  float32 (epilogue DGELU_BGRAD)
Both return None when cuBLASLt cannot do it here (no library, an unaligned pointer or leading dimension, or the
heuristic finds no kernel for the description): kernels/mlp.py then uses the separate kernels.

Arithmetic (cuBLASLt docs, cublasLtEpilogue_t): the products accumulate in float32; the epilogue works on that
float32 accumulator (plus the float32 bias), and only what is stored is rounded to bf16: h, the aux `pre`, dpre.
The bias gradient is summed from the float32 dpre before its rounding, and written as float32
(BIAS_DATA_TYPE = CUDA_R_32F; the default would be D's type, bf16. Should a GPU's cuBLASLt refuse it, the
heuristic finds no algo and kernels/mlp.py sums the bias gradient from the bf16 dpre instead).
Which GELU: the tanh form, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the one GPT-2 and ops/gelu.py use.
cublasLt.h only says "GELU"; PyTorch, whose torch._addmm_activation(use_gelu=True) runs on this epilogue on CUDA,
says it is the tanh form (pytorch/pytorch pull request 104061, 2023: "cuBLASLt-based fused GELU epilogue in the
GPU back-end of the `_addmm_activation` operator uses tanh approximation", which made its other GPU paths match).
tests/gpu/test_mlp_gpu.py checks it on the GPU (tanh form against erf form).

Row-major products in cuBLAS's column-major terms (precision.gemm_args): our (N, M) result is cuBLAS's (M, N)
matrix D, so D's rows are our columns (the M features): the bias is a length-M vector along D's rows, the bias
gradient sums D over its columns (our rows), and the aux matrix has D's shape with leading dimension M (the
header: divisible by 8 and >= D's rows, so M % 8 == 0 is required here).

Descriptors, layouts and the heuristic's algo are made once per (epilogue, shape) and kept (`plans`): a call
then sets the two pointer attributes (bias, aux) and calls cublasLtMatmul, three host calls. So that one algo
serves every call, it is chosen for pointers only 16-byte aligned: the preference says so for A, B, C and D
(cuBLASLt's default assumes 256 bytes), and the bias and aux pointers, whose values the heuristic reads only for
their alignment, are set to 16 while it chooses. Calls with a pointer less aligned use the separate kernels.
"""
import threading
from types import SimpleNamespace

from . import cublaslt_ctypes as lt
from . import precision
from .precision import _host_scalars, gemm_args

WORKSPACE_BYTES = precision.WORKSPACE_BYTES
_local = threading.local()            # per thread: {device id: the cuBLASLt handle, workspace, plans}


def available():
    return lt.load() is not None


def _state():
    """The cuBLASLt handle of the current device and thread, its workspace and its cache of plans."""
    return precision.per_device(_local, _new_state)


def _new_state():
    import cupy as cp
    # the workspace: the cuBLAS handle's own (precision.py), when it has one. Both libraries run their
    # matmuls on the current stream, one after the other, so they can share it (32 MiB less memory)
    workspace = precision.cublas_handle().workspace
    if workspace is None:
        workspace = cp.empty((WORKSPACE_BYTES,), dtype=cp.uint8)
    return SimpleNamespace(handle=lt.create(), plans={}, workspace=workspace)


ALIGNMENT = 16       # bytes every pointer must be aligned to (8 bf16 values; else the separate kernels run)


def _plan(s, key, epilogue, opa, opb, m, n, k, lda, ldb, ldd):
    """The descriptor, layouts and algo for one description (None when the heuristic finds no kernel)."""
    if key in s.plans:
        return s.plans[key]
    pref = lt.preference_create()
    lt.preference_set(pref, lt.PREF_MAX_WORKSPACE_BYTES, WORKSPACE_BYTES)
    for attribute in (lt.PREF_MIN_ALIGNMENT_A_BYTES, lt.PREF_MIN_ALIGNMENT_B_BYTES, lt.PREF_MIN_ALIGNMENT_C_BYTES,
                      lt.PREF_MIN_ALIGNMENT_D_BYTES):
        lt.preference_set(pref, attribute, ALIGNMENT)
    desc = lt.matmul_desc_create(lt.CUBLAS_COMPUTE_32F, lt.CUDA_R_32F)
    lt.matmul_desc_set(desc, lt.DESC_TRANSA, opa)
    lt.matmul_desc_set(desc, lt.DESC_TRANSB, opb)
    lt.matmul_desc_set(desc, lt.DESC_EPILOGUE, epilogue)
    if epilogue in (lt.EPILOGUE_GELU_AUX_BIAS, lt.EPILOGUE_DGELU_BGRAD):
        lt.matmul_desc_set(desc, lt.DESC_BIAS_DATA_TYPE, lt.CUDA_R_32F)
        lt.matmul_desc_set(desc, lt.DESC_BIAS_POINTER, ALIGNMENT)     # the heuristic reads only these pointers'
    lt.matmul_desc_set(desc, lt.DESC_EPILOGUE_AUX_POINTER, ALIGNMENT)    # alignment: the least a call may have
    lt.matmul_desc_set(desc, lt.DESC_EPILOGUE_AUX_LD, ldd)
    lt.matmul_desc_set(desc, lt.DESC_EPILOGUE_AUX_DATA_TYPE, lt.CUDA_R_16BF)
    # stored (column-major) shapes: A is (m, k), or (k, m) when transposed; B is (k, n), or (n, k)
    a = lt.matrix_layout_create(lt.CUDA_R_16BF, *((m, k) if opa == lt.CUBLAS_OP_N else (k, m)), lda)
    b = lt.matrix_layout_create(lt.CUDA_R_16BF, *((k, n) if opb == lt.CUBLAS_OP_N else (n, k)), ldb)
    d = lt.matrix_layout_create(lt.CUDA_R_16BF, m, n, ldd)
    algo = lt.algo_get_heuristic(s.handle, desc, a, b, d, d, pref)
    lt.preference_destroy(pref)
    plan = SimpleNamespace(desc=desc, a=a, b=b, d=d, algo=algo) if algo is not None else None
    if plan is None:
        lt.matmul_desc_destroy(desc)
        for layout in (a, b, d):
            lt.matrix_layout_destroy(layout)
    s.plans[key] = plan
    return plan


def _matmul(x, w, trans_w, out, epilogue, bias, aux):
    """out (N, M) = epilogue(x @ op(w)) for bf16 x, w, out; bias: float32 (M,) read or written, or None; aux: the
    bf16 (N, M) GELU input, written (forward) or read (backward). False when cuBLASLt cannot do it."""
    import cupy as cp
    x, w = precision.dense(x), precision.dense(w)
    N, K = x.shape
    M = w.shape[0] if trans_w else w.shape[1]
    w_ptr, x_ptr, out_ptr, aux_ptr = w.data.ptr, x.data.ptr, out.data.ptr, aux.data.ptr     # device addresses
    bias_ptr = bias.data.ptr if bias is not None else 0
    if not available() or M % 8 or any(int(p) % ALIGNMENT for p in (w_ptr, x_ptr, out_ptr, aux_ptr, bias_ptr)):
        return False
    # cuBLAS's A is our w, its B our x (precision.gemm_args: C^T = op(w)^T x^T)
    opa, opb, m, n, k, lda, ldb, ldd = gemm_args(N, K, M, trans_b=trans_w)
    s = _state()
    key = (epilogue, opa, m, n, k)
    plan = _plan(s, key, epilogue, opa, opb, m, n, k, lda, ldb, ldd)
    if plan is None:
        return False
    if bias is not None:
        lt.matmul_desc_set(plan.desc, lt.DESC_BIAS_POINTER, bias_ptr)
    lt.matmul_desc_set(plan.desc, lt.DESC_EPILOGUE_AUX_POINTER, aux_ptr)
    p_alpha, p_beta = _host_scalars(1.0, 0.0)
    lt.matmul(s.handle, plan.desc, p_alpha, w_ptr, plan.a, x_ptr, plan.b, p_beta, out_ptr, plan.d,
              out_ptr, plan.d, plan.algo, s.workspace.data.ptr, WORKSPACE_BYTES, cp.cuda.get_current_stream().ptr)
    return True


def gelu_gemm(x, w, b):
    """x (N, K) bf16, w (K, M) bf16, b (M,) float32 or None -> (h, pre), both (N, M) bf16: pre = x @ w + b and
    h = gelu(pre). None when cuBLASLt cannot do it here."""
    import cupy as cp
    if b is not None and (b.dtype != cp.float32 or not b.flags.c_contiguous):
        return None
    N, M = x.shape[0], w.shape[1]
    h = cp.empty((N, M), dtype=cp.uint16)
    pre = cp.empty((N, M), dtype=cp.uint16)
    epilogue = lt.EPILOGUE_GELU_AUX_BIAS if b is not None else lt.EPILOGUE_GELU_AUX
    return (h, pre) if _matmul(x, w, False, h, epilogue, b, pre) else None


def dgelu_gemm(dy, w, pre, with_bias_grad):
    """dy (N, C) bf16, w (M, C) bf16, pre (N, M) bf16 -> (dpre (N, M) bf16, db (M,) float32 or None):
    dpre = (dy @ w.T) * gelu'(pre), db its column sums (with_bias_grad). None when cuBLASLt cannot do it here."""
    import cupy as cp
    N, M = dy.shape[0], w.shape[0]
    dpre = cp.empty((N, M), dtype=cp.uint16)
    db = cp.empty((M,), dtype=cp.float32) if with_bias_grad else None
    epilogue = lt.EPILOGUE_DGELU_BGRAD if with_bias_grad else lt.EPILOGUE_DGELU
    return (dpre, db) if _matmul(dy, w, True, dpre, epilogue, db, pre) else None
