"""Backend dispatch (explicit > SPECTRA_GPU_BACKEND > automatic), import without triton/cupy/GPU, the env report,
and the CuPy LOBPCG wrapper, exercised on CPU through scipy (cupyx's lobpcg is a port of scipy's; the wrapper
is written against the array-module pair)."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import spectra_gpu as sg
from spectra_gpu.backends import REGISTRY, laplacian_operator, registry, select
from spectra_gpu.backends.cupy import lobpcg_xp
from spectra_gpu.errors import BackendUnavailableError, ConvergenceWarning
from spectra_gpu.ops.graph_laplacian import graph_laplacian_torch
from spectra_gpu.ops.knn_graph import knn_graph_torch
from spectra_gpu.ops.lobpcg import LobpcgResult, generalized_eigh_dense, lobpcg_torch
from spectra_gpu.ops.union_graph import union_graph_torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _run(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (1 thread); it prints one JSON line, returned parsed."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_and_score_without_triton_cupy_or_gpu():
    res = _run("""
import json, sys
sys.modules["triton"] = None   # as if not installed: import fails and importlib.util.find_spec returns None
sys.modules["cupy"] = None
import torch
import spectra_gpu as sg
from spectra_gpu.backends import available_backends
from spectra_gpu.env import report
g = torch.Generator().manual_seed(0)
pre = torch.randn(30, 8, generator=g) @ torch.randn(8, 40, generator=g)
res = sg.score(pre, torch.relu(pre), k=4, num_eigs=4)
try:
    sg.score(pre, torch.relu(pre), k=4, num_eigs=4, backend="triton")
    err = ""
except sg.BackendUnavailableError as e:
    err = str(e)
print(json.dumps({"finite": bool(torch.isfinite(res.scores).all()), "err": err,
                  "avail": {k: list(v) for k, v in available_backends().items()}, "report": report()}))
""", TRITON_INTERPRET="0")
    assert res["finite"]
    assert "backend 'triton' rejected: triton is not installed" in res["err"]
    assert res["avail"]["triton"] == [False, "triton is not installed (pip install 'spectra_gpu[cuda]')"]
    assert res["avail"]["cupy"][0] is False and "not installed" in res["avail"]["cupy"][1]
    assert res["avail"]["torch"] == [True, ""]
    rep = res["report"]
    assert "triton not installed" in rep and "cupy not installed" in rep
    assert "backend torch (auto priority 100; ops graph_laplacian, knn_graph, laplacian_apply, lobpcg, " \
           "union_graph): available" in rep


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reasons")
def test_without_interpreter_cpu_tensors_are_rejected_and_auto_falls_back_once():
    res = _run("""
import json, logging, torch
records = []
class H(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger("spectra_gpu").addHandler(H()); logging.getLogger("spectra_gpu").setLevel(logging.INFO)
from spectra_gpu.backends import REGISTRY, select
x = torch.randn(20, 5)
try:
    select("knn_graph", x, 3, backend="triton")
    err = ""
except Exception as e:
    err = f"{type(e).__name__}: {e}"
auto = [select("knn_graph", x, 3) is REGISTRY["torch"].ops["knn_graph"] for _ in range(3)]
import sys
print(json.dumps({"err": err, "auto": auto, "logs": records, "kernels": "spectra_gpu.kernels" in sys.modules}))
""", TRITON_INTERPRET="0")
    assert not res["kernels"]  # without a GPU, dispatch never loads the kernel modules
    assert res["err"].startswith("BackendUnavailableError: knn_graph: backend 'triton' rejected: no CUDA device")
    assert res["auto"] == [True, True, True]
    triton_logs = [m for m in res["logs"] if "'triton'" in m]
    assert len(triton_logs) == 1 and "no CUDA device" in triton_logs[0]  # logged once, with the reason


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
class TestDispatchUnderInterpreter:
    def test_explicit_env_and_auto(self, monkeypatch):
        pytest.importorskip("triton")
        x = torch.randn(20, 5)
        monkeypatch.delenv("SPECTRA_GPU_BACKEND", raising=False)
        assert select("knn_graph", x, 3, backend="triton") is REGISTRY["triton"].ops["knn_graph"]
        # the interpreter is a test vehicle: automatic choice never picks it over torch
        assert select("knn_graph", x, 3) is REGISTRY["torch"].ops["knn_graph"]
        monkeypatch.setenv("SPECTRA_GPU_BACKEND", "triton")
        assert select("knn_graph", x, 3) is REGISTRY["triton"].ops["knn_graph"]
        assert select("knn_graph", x, 3, backend="torch") is REGISTRY["torch"].ops["knn_graph"]  # argument wins

    def test_triton_rejections_name_the_reason(self):
        pytest.importorskip("triton")
        with pytest.raises(BackendUnavailableError, match=r"knn_graph: backend 'triton' rejected: torch.float64 "
                                                          r"input: the Triton kNN computes in fp32"):
            sg.knn_graph(torch.randn(20, 5, dtype=torch.float64), 3, backend="triton")
        with pytest.raises(BackendUnavailableError, match="k=200 > 128"):
            sg.knn_graph(torch.randn(300, 2), 200, backend="triton")
        ok, why = REGISTRY["triton"].supports("laplacian_apply", torch.zeros(3, 3, dtype=torch.float16))
        assert not ok and "float32/float64" in why


def test_unknown_backend_lists_the_known_ones(monkeypatch):
    with pytest.raises(BackendUnavailableError, match=r"unknown backend 'cuda': expected one of \['cupy', "
                                                      r"'torch', 'triton'\] \(from the backend argument\)"):
        sg.knn_graph(torch.randn(10, 3), 2, backend="cuda")
    monkeypatch.setenv("SPECTRA_GPU_BACKEND", "gpu")
    with pytest.raises(BackendUnavailableError, match="from SPECTRA_GPU_BACKEND"):
        sg.knn_graph(torch.randn(10, 3), 2)


def test_cupy_explicit_request_names_why(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="backend 'cupy' rejected: .*(cupy|CUDA)"):
        sg.knn_graph(torch.randn(10, 3), 2, backend="cupy")
    ok, why = REGISTRY["cupy"].supports("knn_graph", torch.randn(4, 2))
    assert not ok and why == "the cupy backend implements only the eigen-solver ('lobpcg')"
    ok, why = REGISTRY["cupy"].supports("lobpcg", torch.randn(4, 4))
    assert not ok and "needs CUDA tensors" in why


def test_auto_fallback_logs_once_per_reason(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_logged", set())
    a = torch.eye(4)
    with caplog.at_level(logging.INFO, logger="spectra_gpu"):
        for _ in range(3):
            assert select("lobpcg", a) is REGISTRY["torch"].ops["lobpcg"]
    msgs = [r.getMessage() for r in caplog.records if "'cupy'" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("spectra_gpu: lobpcg: backend 'cupy' not used (")


def _pencil(n: int = 150, k: int = 6, device: str = "cpu"):
    """L_X and the B = L_Y + (dbar/N) 1 1^T operator of two kNN graphs, as sg.score builds them."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(n, 12, generator=g, dtype=torch.float64)
    gx = union_graph_torch(knn_graph_torch(z, k))
    gy = union_graph_torch(knn_graph_torch(torch.tanh(z @ torch.randn(12, 12, generator=g, dtype=torch.float64)), k))
    lx, ly = graph_laplacian_torch(gx).to(device), graph_laplacian_torch(gy).to(device)
    c = float(gy.degree().mean()) / n
    bmul = laplacian_operator(ly, c)
    jac = (1.0 / (gy.degree() + c))[:, None].to(device)
    dense_b = ly.to_dense() + c
    return lx, bmul, (lambda r: r * jac), dense_b


def test_cupy_wrapper_on_scipy_matches_dense_and_torch():
    lx, bmul, prec, dense_b = _pencil()
    res = lobpcg_xp(np, scipy.sparse.linalg, laplacian_operator(lx), 5, bmul, m=prec, n=lx.shape[0], tol=1e-8,
                    maxiter=2000, device=lx.device)
    assert isinstance(res, LobpcgResult) and res.converged and res.iterations > 0
    assert res.eigenvalues.dtype == torch.float64 and res.eigenvectors.shape == (lx.shape[0], 5)
    oracle = generalized_eigh_dense(lx.to_dense(), dense_b, 5)
    torch.testing.assert_close(res.eigenvalues, oracle.eigenvalues, rtol=1e-6, atol=1e-8)
    u = res.eigenvectors
    torch.testing.assert_close(u.T @ dense_b @ u, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-6)
    assert bool((res.residuals < 1e-8).all())
    ref = lobpcg_torch(laplacian_operator(lx), 5, bmul, m=prec, n=lx.shape[0], tol=1e-8, maxiter=2000)
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-6, atol=1e-8)


def test_cupy_wrapper_reports_non_convergence():
    lx, bmul, _, _ = _pencil()
    with pytest.warns(ConvergenceWarning, match=r"lobpcg \(numpy\): 5 eigenpairs not converged after 2"):
        res = lobpcg_xp(np, scipy.sparse.linalg, lx, 5, bmul, tol=1e-12, maxiter=2)
    assert not res.converged and bool((res.residuals > 1e-12).any())
    with pytest.raises(ValueError, match="3\\*block <= N"):
        lobpcg_xp(np, scipy.sparse.linalg, lx, 60, bmul)


@pytest.mark.cuda
def test_cupy_lobpcg_on_gpu_matches_torch():
    ok, why = REGISTRY["cupy"].is_available()
    if not ok:
        pytest.skip(f"cupy backend unavailable: {why}")
    lx, bmul, prec, _ = _pencil(device="cuda")
    solve = select("lobpcg", lx)
    assert solve is REGISTRY["cupy"].ops["lobpcg"]  # automatic choice for CUDA tensors when CuPy sees a GPU
    res = solve(laplacian_operator(lx), 5, bmul, m=prec, n=lx.shape[0], tol=1e-8, maxiter=2000, device=lx.device)
    ref = lobpcg_torch(laplacian_operator(lx), 5, bmul, m=prec, n=lx.shape[0], tol=1e-8, maxiter=2000)
    assert res.converged and res.eigenvalues.device.type == "cuda"
    got = sg.lobpcg(laplacian_operator(lx), 5, bmul, m=prec, n=lx.shape[0], tol=1e-8, maxiter=2000, device=lx.device)
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, rtol=1e-6, atol=1e-8)  # the public op picks cupy
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-6, atol=1e-8)


def test_one_name_per_op_across_layers():
    """Each op stem names its reference ``ops/<stem>.py::<stem>_torch``, its kernel ``kernels/<stem>.py::<stem>_triton``
    (lobpcg has none: the triton backend runs the reference over kernel operators), the registry key, the public
    op, its tests and its benchmark."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stems = set(REGISTRY["torch"].ops)
    assert stems == {"knn_graph", "union_graph", "graph_laplacian", "laplacian_apply", "lobpcg"}
    assert set(REGISTRY["triton"].ops) == stems and set(REGISTRY["cupy"].ops) == {"lobpcg"}
    for stem in sorted(stems):
        assert REGISTRY["torch"].ops[stem].__name__ == f"{stem}_torch"
        assert REGISTRY["triton"].ops[stem].__name__ == ("lobpcg_torch" if stem == "lobpcg" else f"{stem}_triton")
        assert callable(getattr(sg.backends, stem))
        files = [f"spectra_gpu/ops/{stem}.py", f"tests/ops/test_{stem}.py", f"benchmarks/bench_{stem}.py"]
        if stem != "lobpcg":
            files += [f"spectra_gpu/kernels/{stem}.py", f"tests/kernels/test_{stem}_kernel.py"]
        for rel in files:
            assert os.path.isfile(os.path.join(root, rel)), rel
        with open(os.path.join(root, f"spectra_gpu/ops/{stem}.py")) as f:
            assert f"def {stem}_torch(" in f.read()
        if stem != "lobpcg":
            with open(os.path.join(root, f"spectra_gpu/kernels/{stem}.py")) as f:
                assert f"def {stem}_triton(" in f.read()
    assert REGISTRY["cupy"].ops["lobpcg"].__name__ == "lobpcg_cupy"
