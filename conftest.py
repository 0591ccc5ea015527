"""The harness's spine: backend, GPU pinning, hypothesis profile, implementations, repro lines.

Order matters: the backend is configured (TRITON_INTERPRET set, this worker's GPU pinned, its
Triton cache chosen) before anything imports triton or initialises CUDA.
"""
from properties import backend

backend.configure()

import json  # noqa: E402

import pytest  # noqa: E402

from properties import harness, profiles, registry  # noqa: E402

profiles.load()


def pytest_addoption(parser):
    group = parser.getgroup("kernelfuzz")
    group.addoption("--impl", action="append", default=[], metavar="OP=module:function",
                    help="add an implementation of OP (another library's kernel, or a registered "
                         "mutant's name: OP=NAME) to every property of OP")
    group.addoption("--case", default=None, metavar="JSON",
                    help="run the selected property tests on this one case instead of drawing cases")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # ours wins over hypothesis's 'ci' profile: --hypothesis-profile, else KERNELFUZZ_PROFILE,
    # else premerge under CI and dev elsewhere
    config.kf_profile = profiles.load(config.getoption("hypothesis_profile", None))
    if config.kf_profile.startswith("premerge") and config.getoption("hypothesis_seed", None) is None:
        profiles.force_seed(profiles.PREMERGE_SEED)
        config.kf_seed = profiles.PREMERGE_SEED
    else:
        config.kf_seed = config.getoption("hypothesis_seed", None)
    for spec in config.getoption("impl"):
        op, _, target = spec.partition("=")
        if ":" in target:
            registry.add_from_option(spec)
        else:
            mutant = registry.get(op, target)
            config.kf_extra = getattr(config, "kf_extra", []) + [mutant]


def pytest_report_header(config):
    from hypothesis import settings
    s = settings.default
    seed = config.kf_seed
    return [f"kernelfuzz: backend {backend.describe()}",
            f"kernelfuzz: hypothesis profile {config.kf_profile} (max_examples {s.max_examples}, "
            f"seed {seed if seed is not None else 'random'}, database {s.database!r})"]


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        op = getattr(metafunc.module, "OP", None)
        impls = registry.implementations(op)
        impls += [m for m in getattr(metafunc.config, "kf_extra", []) if m.op == op]
        metafunc.parametrize("impl", impls, ids=[i.name for i in impls])


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """--case JSON: run the property body on that case (no hypothesis)."""
    case = pyfuncitem.config.getoption("case")
    body = getattr(pyfuncitem.obj, "kf_body", None)
    if case is None or body is None:
        return None
    harness.run_case(body, pyfuncitem.funcargs["impl"], harness.Case(json.loads(case)))
    return True


_device_fault = None  # set when a test lost the GPU context (harness.DeviceFault)


def pytest_runtest_setup(item):
    harness.last_repro = None


def pytest_runtest_logfinish(nodeid, location):
    """After a DeviceFault has been reported, no later test can run in this process: an xdist
    worker exits (the controller reports it and starts a fresh worker for the remaining tests); a
    single process stops the session."""
    if _device_fault is None:
        return
    import os
    import sys
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stderr.write(f"kernelfuzz: {nodeid} lost the GPU context ({_device_fault}); ending this worker\n")
        sys.stderr.flush()
        os._exit(70)
    pytest.exit(f"{nodeid} lost the GPU context ({_device_fault}); no later test can run", returncode=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    global _device_fault
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(harness.DeviceFault):
        _device_fault = str(call.excinfo.value).splitlines()[0]
    if report.when == "call" and report.failed:
        line = harness.last_repro or f"{harness.REPRO_COMMAND} '{item.nodeid}'"
        seed = item.config.kf_seed
        if harness.last_repro is None and seed is not None:
            line += f" --hypothesis-seed={seed}"
        report.sections.append(("reproduce", line))


def pytest_runtest_logreport(report):
    """KERNELFUZZ_LOG=path: append every test's outcome and duration as it finishes, and a
    failure's full report, so a run cut short by a time limit still says what failed and why."""
    import os
    path = os.environ.get("KERNELFUZZ_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER") or (report.when != "call" and not report.failed):
        return  # xdist workers' reports reach the controller, which writes them
    with open(path, "a") as f:
        f.write(f"{report.outcome.upper():7} {report.duration:7.1f}s {report.nodeid} ({report.when})\n")
        if report.failed:
            f.write(report.longreprtext[-4000:] + "\n")
            for name, text in report.sections:
                if name == "reproduce":
                    f.write(f"reproduce: {text}\n")
            f.write("-" * 80 + "\n")
