"""The harness's own pieces fail when they should: the budget, bit-exact comparison, guards,
poisoned allocations, backend pinning, a lost GPU context."""
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from properties import builders, harness
from properties.compare import assert_bitwise, assert_close, budget_of
from properties.guard import Guarded, Unchanged, poison_allocations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_budget_rule():
    golden = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    reference = golden + torch.tensor([1e-6, 0.0, -3e-6], dtype=torch.float64)
    budget, ref_err, gmax = budget_of(golden, reference, torch.bfloat16)
    assert ref_err == pytest.approx(3e-6) and gmax == 4.0
    assert budget == pytest.approx(2 * (3e-6 + 2.0 ** -7 * 4.0))
    assert budget_of(golden, reference, torch.float8_e4m3fn)[0] == pytest.approx(2 * (3e-6 + 0.125 * 4.0))
    inside = golden.clone()
    inside[1] += 0.99 * budget
    assert_close("x", inside.float(), golden, reference, torch.bfloat16)
    outside = golden.clone()
    outside[2] += 1.01 * budget
    with pytest.raises(AssertionError, match=r"x: error .* at index \(2,\) exceeds the budget"):
        assert_close("x", outside, golden, reference, torch.bfloat16)


def test_margins_log(tmp_path, monkeypatch):
    """With KERNELFUZZ_MARGINS set, each comparison appends its error over its budget, passing or not."""
    monkeypatch.setenv("KERNELFUZZ_MARGINS", str(tmp_path))
    golden = torch.tensor([1.0, -2.0], dtype=torch.float64)
    reference = golden + 1e-3
    budget = budget_of(golden, reference, torch.float32)[0]
    actual = golden.clone()
    actual[1] += 0.25 * budget
    assert_close("near", actual, golden, reference, torch.float32)
    actual[0] -= 3 * budget
    with pytest.raises(AssertionError):
        assert_close("past", actual, golden, reference, torch.float32)
    rows = [line.split("\t") for line in (tmp_path / f"margins-{os.getpid()}.tsv").read_text().splitlines()]
    # the log writes ratios with 4 significant digits, hence rel=1e-3
    assert [(r[1], float(r[0])) for r in rows] == [("near", pytest.approx(0.25, rel=1e-3)),
                                                   ("past", pytest.approx(3.0, rel=1e-3))]


def test_nan_and_inf_fail_where_golden_is_finite():
    golden = torch.zeros(4, dtype=torch.float64)
    for bad in (math.nan, math.inf, -math.inf):
        actual = torch.zeros(4)
        actual[3] = bad
        with pytest.raises(AssertionError, match=r"index \(3,\)"):
            assert_close("o", actual, golden, golden, torch.float32)


def test_non_finite_golden_must_be_matched():
    golden = torch.tensor([-math.inf, 1.0], dtype=torch.float64)
    assert_close("lse", torch.tensor([-math.inf, 1.0]), golden, golden, torch.float32)
    with pytest.raises(AssertionError, match="golden is -inf"):
        assert_close("lse", torch.tensor([0.0, 1.0]), golden, golden, torch.float32)


def test_bitwise():
    a = torch.tensor([1.0, math.nan, -0.0])
    assert_bitwise("a", a, a.clone())
    with pytest.raises(AssertionError, match="not bit-exact"):
        assert_bitwise("a", a, torch.tensor([1.0, math.nan, 0.0]))  # -0.0 vs 0.0


def test_guard_bands_catch_stray_writes():
    g = builders.generator(0)
    buf = Guarded((3, 4), torch.bfloat16, "cpu", g, strides=(6, 1), guard=5)
    buf.tensor[1].fill_(1.0)
    buf.check("cache", torch.tensor([False, True, False])[:, None])   # row 1 allowed
    buf.buffer[buf.guard + 3 * 6 + 1] = 7.0                            # just past the view
    with pytest.raises(AssertionError, match="guard band after|buffer"):
        buf.check("cache", torch.tensor([False, True, False])[:, None])
    gap = Guarded((2, 2), torch.float32, "cpu", g, strides=(3, 1), guard=2)
    gap.buffer[gap.guard + 2] = 0.5                                     # the gap between rows
    with pytest.raises(AssertionError, match="gap between strides"):
        gap.check("x")


def test_unchanged_and_poison():
    x = torch.ones(3)
    watch = Unchanged(x=x)
    x[0] = 2.0
    with pytest.raises(AssertionError, match="input x was modified"):
        watch.check()
    original = torch.empty
    with poison_allocations():
        e = torch.empty(4)
        i = torch.empty(2, dtype=torch.int32)
        like = torch.empty_like(x)
    assert torch.isnan(e).all() and torch.isnan(like).all() and (i == torch.iinfo(torch.int32).max).all()
    assert torch.empty is original


def test_backend_pins_each_worker_to_one_gpu():
    script = ("from properties import backend; backend.configure(); import os; "
              "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['TRITON_CACHE_DIR'])")
    env = {**os.environ, "KERNELFUZZ_BACKEND": "cuda", "CUDA_VISIBLE_DEVICES": "3,5",
           "PYTEST_XDIST_WORKER": "gw3", "TRITON_CACHE_DIR": "/tmp/tc"}
    for var in ("KERNELFUZZ_GPUS", "KERNELFUZZ_TRITON_CACHE_BASE", "TRITON_INTERPRET"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "/tmp/tc/gw3"]   # gw3 -> entry 3 mod 2 of the outer list


def test_backend_shares_cores_and_compiles():
    script = ("from properties import backend; backend.configure(); import os, torch; "
              "print(torch.get_num_threads(), os.environ['TRITON_CACHE_MANAGER'])")
    env = {**os.environ, "KERNELFUZZ_BACKEND": "cuda", "CUDA_VISIBLE_DEVICES": "0",
           "PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": str(os.cpu_count() or 1)}
    for var in ("KERNELFUZZ_GPUS", "KERNELFUZZ_TRITON_CACHE_BASE", "TRITON_INTERPRET", "TRITON_CACHE_MANAGER"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "properties.triton_cache:SiblingCacheManager"]


def test_sibling_cache_reads_what_another_worker_compiled(tmp_path, monkeypatch):
    from triton import knobs

    from properties.triton_cache import SiblingCacheManager
    monkeypatch.setenv("KERNELFUZZ_TRITON_CACHE_BASE", str(tmp_path))

    def manager(worker, key):
        monkeypatch.setattr(knobs.cache, "dir", str(tmp_path / worker))
        return SiblingCacheManager(key)

    writer = manager("gw0", "KEY")
    child = writer.put(b"binary", "k.cubin")
    writer.put_group("k.json", {"k.cubin": child})
    assert manager("gw1", "KEY").get_group("k.json") == {"k.cubin": child}
    assert manager("gw1", "OTHER").get_group("k.json") is None
    # a worker's own copy wins; a group whose child is missing is not used
    own = manager("gw2", "KEY")
    own.put_group("k.json", {"k.cubin": own.put(b"mine", "k.cubin")})
    assert manager("gw2", "KEY").get_group("k.json") == {"k.cubin": str(tmp_path / "gw2" / "KEY" / "k.cubin")}
    broken = manager("gw3", "BROKEN")
    broken.put_group("k.json", {"k.cubin": str(tmp_path / "gw3" / "BROKEN" / "missing.cubin")})
    assert manager("gw4", "BROKEN").get_group("k.json") is None
    # never outside the run's cache base
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path.parent / "elsewhere"))
    assert SiblingCacheManager("KEY").get_group("k.json") is None


def _fault_body(calls):
    def test_fault(impl, case):
        calls.append(case.x)
        if case.x > 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        assert case.x != 2  # an ordinary failure, for the contrast
    test_fault.__module__ = "properties.test_fake_op"
    return test_fault


def test_device_fault_stops_hypothesis_at_the_faulting_case():
    """A context-poisoning CUDA error ends the property at the case that caused it: no shrinking
    through a dead context, and the reproduce line names that case."""
    calls = []
    body = _fault_body(calls)
    impl = types.SimpleNamespace(op="fake_op", name="triton", kind="production")

    @settings(max_examples=50, database=None, derandomize=True)
    @given(st.integers(4, 1000))
    def fuzz(x):
        harness.run_case(body, impl, harness.Case(x=x, seed=0))

    with pytest.raises(harness.DeviceFault, match=r"context is lost; reproduce: .*--case") as info:
        fuzz()
    assert len(calls) == 1, calls
    assert f'"x":{calls[0]}' in str(info.value)
    # an ordinary failure is not a device fault (hypothesis shrinks it as usual)
    with pytest.raises(AssertionError):
        harness.run_case(body, impl, harness.Case(x=2, seed=0))
    assert not harness.is_device_fault(RuntimeError("CUDA out of memory"))


def test_device_fault_ends_the_worker_and_the_rest_still_run(tmp_path):
    """After a DeviceFault an xdist worker exits and a fresh one runs the remaining tests; a
    single process stops the session."""
    (tmp_path / "test_fault.py").write_text(textwrap.dedent("""
        from properties import harness

        def test_a_faults():
            raise harness.DeviceFault("CUDA error: an illegal memory access was encountered")

        def test_b_runs():
            pass
    """))
    env = dict(os.environ, PYTHONPATH=ROOT, KERNELFUZZ_BACKEND="interpreter")
    base = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", str(tmp_path)]
    one = subprocess.run(base + ["-p", "no:xdist"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert one.returncode != 0 and "lost the GPU context" in one.stdout + one.stderr, one.stdout[-2000:]
    assert "test_b_runs PASSED" not in one.stdout and "1 passed" not in one.stdout, one.stdout[-2000:]
    workers = subprocess.run(base + ["-n", "1", "-p", "xdist", "-rA"], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
    out = workers.stdout + workers.stderr
    assert "PASSED test_fault.py::test_b_runs" in out and "FAILED test_fault.py::test_a_faults" in out, out[-3000:]
