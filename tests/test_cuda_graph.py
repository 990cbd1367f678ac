"""--cuda_graph (nanogpt_np/cuda_graph.py) on the fake CuPy: the captured-and-replayed step trains exactly like
the eager step.

The fake's capture (tests/emulation/trace_cupy.py, Tracer with arithmetic) behaves as CUDA's does where it
matters here: between begin_capture and end_capture nothing is computed, only recorded (arrays made during the
capture hold NaN until a replay fills them); host<->device copies raise as CuPy's do; Graph.launch recomputes
every recorded op (our kernels, cuBLAS, CuPy array ops, memsets) from the arrays' current contents with the
arguments and scalars of the capture (cuBLAS's alpha/beta as read at capture). So a replay that froze a
per-step value (lr, bias corrections, the batch) gives different numbers, and one that did not recompute
gives NaN: the negative controls below show both are caught.
"""
import json

import numpy as np
import pytest

from nanogpt_np import backend
from nanogpt_np.config import ConfigError, parse_args
from nanogpt_np.kernels import cross_entropy as ce_kernel
from nanogpt_np.kernels import registry
from nanogpt_np.trainer import train

TINY = ["--model=tiny", "--n_layer=1", "--n_head=2", "--n_embd=128", "--block_size=16", "--batch_size=2",
        "--eval_iters=1", "--log_interval=1", "--max_iters=5", "--lr_decay_iters=6", "--warmup_iters=2",
        "--eval_interval=3", "--device=cuda"]


def _train(out_dir, *extra, attention="flash", said=None):
    """Train TINY + extra on the fake GPU (under a Tracer with arithmetic) with the given attention (--cuda_graph
    needs flash); returns (log records, weights). `said`: a list that collects what the run printed."""
    from emulation import trace_cupy
    try:
        with trace_cupy.Tracer(shape_only=False, sms=5):
            registry.set_attention(attention)          # float32 keeps it; bfloat16 picks flash anyway
            cfg = parse_args(TINY + [f"--out_dir={out_dir}", *extra])
            train(cfg, echo=lambda *a: said.append(" ".join(map(str, a))) if said is not None else None)
    finally:
        backend.use_device("cpu")
        registry.set_attention("matmul")
        registry.set_precision("float32")
        ce_kernel.set_inplace(False)
        ce_kernel.set_assume_unit_dloss(False)
    with open(out_dir / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    return log, _weights(out_dir)


def _weights(out_dir):
    from nanogpt_np.io.checkpoint import load_model
    return np.asarray(load_model(str(out_dir)).flat_params).copy()       # (on the CPU: the test resets it)


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    """The eager float32 run the graph runs are compared with: (log, final weights)."""
    return _train(tmp_path_factory.mktemp("eager"))


def _numbers(log):
    return [(e["type"], e["step"], e.get("loss"), e.get("grad_norm"), e.get("val_loss")) for e in log]


@pytest.mark.parametrize("extra", [[], ["--dtype=bfloat16", "--grad_accum_steps=2"]])
def test_graph_replays_train_exactly_like_eager_steps(tmp_path, monkeypatch, eager_run, extra):
    """Step 1 eager, step 2 captured and replayed, steps 3-5 replayed: the same logged losses, gradient norms
    and validation losses, and the same final weights, bit for bit, as the eager run."""
    from emulation import trace_cupy
    eager_log, eager_w = _train(tmp_path / "eager", *extra) if extra else eager_run
    replays, launch = [], trace_cupy._Graph.launch
    monkeypatch.setattr(trace_cupy._Graph, "launch", lambda g, stream=None: (replays.append(len(g.closures)),
                                                                            launch(g, stream))[1])
    graph_log, graph_w = _train(tmp_path / "graph", "--cuda_graph=true", *extra)
    assert len(replays) == 4 and min(replays) > 50, replays       # steps 2-5, each the whole step's ops
    assert len([e for e in eager_log if e["type"] == "train"]) == 5
    assert _numbers(graph_log) == _numbers(eager_log)
    np.testing.assert_array_equal(graph_w, eager_w)
    losses = [e["loss"] for e in graph_log if e["type"] == "train"]
    assert len(set(losses)) == len(losses)                  # every step's loss is its own (weights move)


def test_resume_with_cuda_graph_continues_exactly(tmp_path, eager_run):
    """A --cuda_graph run stopped at step 3 and resumed (a new graph: eager step, capture, replays) ends like
    the uninterrupted eager run: the same losses after the resume, the same weights."""
    eager_log, eager_w = eager_run
    _train(tmp_path / "graph", "--cuda_graph=true", "--max_iters=3")
    resumed_log, resumed_w = _train(tmp_path / "graph", "--cuda_graph=true", "--max_iters=5", "--resume")
    assert _numbers(resumed_log) == _numbers(eager_log)
    np.testing.assert_array_equal(resumed_w, eager_w)


def test_a_replay_that_does_not_recompute_or_freezes_the_scalars_is_caught(tmp_path, monkeypatch, eager_run):
    """Negative controls: (1) Graph.launch doing nothing (a replay returning the captured step's outputs), (2)
    AdamW's scalars written once and never again (the old kernel's frozen lr and bias corrections)."""
    from emulation import trace_cupy
    from nanogpt_np.kernels import adamw
    eager_log, _ = eager_run
    with monkeypatch.context() as m:
        m.setattr(trace_cupy._Graph, "launch", lambda self, stream=None: None)
        with pytest.raises(FloatingPointError):              # the captured outputs were never computed: NaN
            _train(tmp_path / "no_replay", "--cuda_graph=true")
    real, written = adamw.step_scalars, []

    def write_once(lr, beta1, beta2, step):
        if not written:
            written.append(real(lr, beta1, beta2, step))
        return written[0]
    monkeypatch.setattr(adamw, "step_scalars", write_once)
    frozen_log, _ = _train(tmp_path / "frozen", "--cuda_graph=true")
    assert _numbers(frozen_log) != _numbers(eager_log)


def test_negative_control_a_capture_that_saw_no_fresh_gradient_buffer_is_caught(tmp_path, monkeypatch, eager_run):
    """The graph holds zero_grad's choice (nanogpt_np/tensor.py, FreshGradBuffers): the 1-D part of the gradient buffer
    memset, the matrices' gradients overwritten by their first gemm (beta = 0). The capture runs the eager step's
    host code, so it makes the same choice, and the replays above equal the eager steps although the matrices'
    buffers still hold the previous step's gradients at every replay. A capture that saw no fresh buffer (beta = 1
    captured, the matrices never zeroed) would add onto those: caught."""
    from nanogpt_np import cuda_graph
    from nanogpt_np.tensor import fresh_grads
    capture = cuda_graph.GraphedStep._capture

    def capture_without_fresh_flags(self, run, scalars):
        with monkeypatch.context() as m:
            m.setattr(fresh_grads, "mark", lambda buffers: None)
            return capture(self, run, scalars)
    monkeypatch.setattr(cuda_graph.GraphedStep, "_capture", capture_without_fresh_flags)
    stale_log, _ = _train(tmp_path / "stale", "--cuda_graph=true")
    eager_log, _ = eager_run
    assert _numbers(stale_log)[:1] == _numbers(eager_log)[:1]          # step 1 is eager: still right
    assert _numbers(stale_log) != _numbers(eager_log)


def test_capture_refuses_host_transfers_as_cupy_does():
    """Inside a capture the fake refuses .item() and host->device copies, as CuPy does (cupy/cuda/memory.pyx),
    so a step that syncs or uploads inside would fail here too."""
    from emulation import trace_cupy
    with trace_cupy.Tracer(shape_only=False, sms=5):
        import cupy as cp
        a = cp.zeros((3,), dtype=cp.float32)
        s = cp.cuda.Stream(non_blocking=True)
        s.begin_capture()
        b = a + 1.0
        with pytest.raises(RuntimeError, match="capturing"):
            b.item(0)
        with pytest.raises(RuntimeError, match="capturing"):
            cp.asarray(np.ones(3, np.float32))
        with pytest.raises(RuntimeError, match="capturing"):
            a.set(np.ones(3, np.float32))
        g = s.end_capture()
        assert np.isnan(np.asarray(b)).all()                 # captured, not run
        g.launch(stream=s)
        a[...] = 2.0
        g.launch(stream=s)
        assert np.asarray(b).tolist() == [3.0, 3.0, 3.0]      # recomputed from a's current contents


@pytest.mark.parametrize("bad,message", [(["--dropout=0.1"], "dropout"), (["--device=cpu"], "GPU")])
def test_unsupported_runs_are_refused(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        _train(tmp_path / "r", "--cuda_graph=true", *bad)


def test_matmul_attention_is_refused_up_front(tmp_path):
    """The matmul attention multiplies with CuPy's matmul, whose cuBLAS calls CuPy refuses in a capture."""
    with pytest.raises(ConfigError, match="flash attention"):
        _train(tmp_path / "r", "--cuda_graph=true", attention="matmul")


def test_cupys_cublas_refuses_a_capture_and_the_project_gemm_does_not():
    """As in CuPy 14 (cupy_backends/cuda/libs/cublas.pyx, setStream): CuPy's gemmEx and matmul raise
    NotImplementedError while the stream captures; precision.gemm (kernels/cublas_ctypes.py) is captured."""
    from emulation import fake_cupy, trace_cupy
    from nanogpt_np.kernels import precision
    with trace_cupy.Tracer(shape_only=False, sms=5):
        import cupy as cp
        from cupy_backends.cuda.libs import cublas
        backend.use_device("cuda")
        try:
            a = cp.asarray(np.random.default_rng().standard_normal((4, 3)).astype(np.float32))
            b = cp.asarray(np.random.default_rng().standard_normal((3, 5)).astype(np.float32))
            out = cp.zeros((4, 5), dtype=cp.float32)
            s = cp.cuda.Stream(non_blocking=True)
            precision.bind_stream()
            s.begin_capture()
            with pytest.raises(NotImplementedError, match=fake_cupy.CAPTURE_REFUSED):
                a @ b
            args = (0, 0, 5, 4, 3) + (precision._host_scalars(1.0, 0.0)[0], b.data.ptr, 0, 5, a.data.ptr, 0, 3,
                                      precision._host_scalars(1.0, 0.0)[1], out.data.ptr, 0, 5, 68, -1)
            with pytest.raises(NotImplementedError, match=fake_cupy.CAPTURE_REFUSED):
                cublas.gemmEx(precision.cublas_handle().ptr, *args)
            c = precision.gemm(a, b, out=out)
            g = s.end_capture()
            assert np.isnan(np.asarray(c)).all() or not np.asarray(c).any()      # captured, not run
            g.launch(stream=s)
            np.testing.assert_allclose(np.asarray(c), np.asarray(a).astype(np.float64) @ np.asarray(b), rtol=1e-6)
        finally:
            backend.use_device("cpu")


def test_a_refused_capture_falls_back_to_eager_steps(tmp_path, monkeypatch, eager_run):
    """With precision.gemm on CuPy's wrapper (no cuBLAS library loaded), the capture is refused: the run says so
    once, ends the capture, and goes on eagerly with the eager run's numbers and weights (no graph replayed)."""
    from emulation import trace_cupy
    from nanogpt_np.kernels import cublas_ctypes
    replays = []
    monkeypatch.setattr(trace_cupy._Graph, "launch", lambda g, stream=None: replays.append(1))
    real_install = trace_cupy.fake_cupy.install

    def install_without_library(p, *a, **k):
        fc = real_install(p, *a, **k)
        p.setattr(cublas_ctypes, "load", lambda: None)        # as if no libcublas.so.* loaded
        return fc
    monkeypatch.setattr(trace_cupy.fake_cupy, "install", install_without_library)
    said = []
    log, w = _train(tmp_path / "refused", "--cuda_graph=true", said=said)
    eager_log, eager_w = eager_run
    refusals = [line for line in said if "could not be captured" in line]
    assert len(refusals) == 1 and "NotImplementedError" in refusals[0], said
    assert replays == []
    assert _numbers(log) == _numbers(eager_log)
    np.testing.assert_array_equal(w, eager_w)


def _stand_in_cdll(monkeypatch, loads, lib):
    """ctypes.CDLL replaced: the library named `loads` is `lib`, every other name fails to load. Returns the list
    of names tried. (load_first imports CuPy's cublas module first; with real CuPy installed that import would
    itself call the stand-in CDLL, for libdl, when it is the first import in the process: it is skipped.)"""
    import ctypes
    from nanogpt_np.kernels import cublas_ctypes
    tried = []

    def cdll(name):
        tried.append(name)
        if name != loads:
            raise OSError(name)
        return lib
    real_import = cublas_ctypes.importlib.import_module
    monkeypatch.setattr(cublas_ctypes.importlib, "import_module",
                        lambda name, *a: None if name.startswith("cupy") else real_import(name, *a))
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    return tried


def test_cublas_ctypes_binding_tries_the_sonames_in_order_and_checks_statuses(monkeypatch):
    """kernels/cublas_ctypes.py on a stand-in library: the first soname that loads is used, every function gets
    its declared argument types, the arguments arrive in CuPy's gemmEx order, and a failing status raises."""
    import ctypes
    import inspect
    from nanogpt_np.kernels import cublas_ctypes

    class Lib:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            def fn(*args):
                self.calls.append((name, args))
                return 13 if name == "cublasSetStream_v2" else 0          # 13: CUBLAS_STATUS_EXECUTION_FAILED
            self.__dict__[name] = fn
            return fn
    lib = Lib()
    tried = _stand_in_cdll(monkeypatch, "libcublas.so.12", lib)
    monkeypatch.setattr(cublas_ctypes, "_lib", None)
    assert cublas_ctypes.load() is lib and tried == ["libcublas.so.13", "libcublas.so.12"]
    assert len(lib.cublasGemmEx.argtypes) == len(inspect.signature(cublas_ctypes.gemm_ex).parameters) == 19
    cublas_ctypes.gemm_ex(*range(19))
    assert lib.calls[-1] == ("cublasGemmEx", tuple(range(19)))
    with pytest.raises(RuntimeError, match="cublasSetStream_v2 failed: cuBLAS status 13"):
        cublas_ctypes.set_stream(1, 2)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    monkeypatch.setattr(cublas_ctypes, "_lib", None)
    assert cublas_ctypes.load() is None


def test_cublaslt_ctypes_loads_the_explicit_path_then_the_sonames(monkeypatch):
    """NANOGPT_CUBLASLT_LIB first, then libcublasLt.so.13, .12, .11; the first that loads is kept (its functions
    declared), and None when none loads (the MLP then uses the separate kernels)."""
    import ctypes
    from nanogpt_np.kernels import cublaslt, cublaslt_ctypes

    class Lib:                        # any attribute is a function whose argtypes / restype can be set
        def __getattr__(self, name):
            fn = type("Fn", (), {})()
            self.__dict__[name] = fn
            return fn
    lib = Lib()
    tried = _stand_in_cdll(monkeypatch, "libcublasLt.so.12", lib)
    monkeypatch.setenv("NANOGPT_CUBLASLT_LIB", "/somewhere/libcublasLt.so")
    monkeypatch.setattr(cublaslt_ctypes, "_lib", None)
    assert cublaslt_ctypes.load() is lib
    assert tried == ["/somewhere/libcublasLt.so", "libcublasLt.so.13", "libcublasLt.so.12"]
    assert lib.cublasLtMatmul.argtypes == cublaslt_ctypes._SIGNATURES["cublasLtMatmul"]
    assert cublaslt_ctypes.load() is lib and len(tried) == 3                 # kept: not looked up again
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    monkeypatch.setattr(cublaslt_ctypes, "_lib", None)
    assert cublaslt_ctypes.load() is None and not cublaslt.available()
