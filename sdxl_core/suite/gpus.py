"""The suite on several GPUs: one pytest-xdist worker per GPU, each pinned to its own before CUDA starts, and the
benchmarks that workers time sent home so pytest-benchmark saves one run. The rules are in `workers.py`; how
it scales, in docs/design.md."""

from __future__ import annotations

import os

import pytest

from sdxl_core.suite import workers

GPUS = pytest.StashKey[list]()  # the GPUs this run may use
DEVICES = pytest.StashKey[dict]()  # worker -> GPU, as the controller made it ({} where nothing is pinned)
WORKER_GPUS = "sdxl_bench_gpus"  # the map's key in each worker's workerinput
WORKER_DIST = "sdxl_bench_dist"  # the controller's --dist, in each worker's workerinput
BENCHMARK = "pytest_benchmark"  # user property: a worker's benchmark result on its way to the controller


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _gpus(config) -> list[str]:
    """The GPUs this run may use (the first --gpus of those visible), found once per process."""
    if GPUS not in config.stash:
        visible = workers.visible_gpus()
        try:
            config.stash[GPUS] = workers.limit_gpus(visible, config.getoption("--gpus"), workers.describe(visible))
        except workers.UserError as exc:
            raise pytest.UsageError(str(exc)) from None
    return config.stash[GPUS]


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config):
    """`--gpus N` starts N workers where -n is not given, and workers take whole variant groups (`loadgroup`)
    unless --dist says otherwise. A wrapper, so it runs before xdist turns -n into workers; a worker has its
    options already."""
    if not _is_worker(config) and config.pluginmanager.hasplugin("xdist"):
        gpus = config.getoption("--gpus")
        if gpus and gpus > 1 and config.option.numprocesses is None:
            config.option.numprocesses = gpus
        if config.option.numprocesses and config.option.dist == "no":
            config.option.dist = "loadgroup"
    return (yield)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` on a GPU host: one worker per GPU; without GPUs, xdist's count of CPU cores."""
    return len(_gpus(config)) or None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """This process's GPU (before anything starts CUDA), and the benchmark relay where workers have GPUs."""
    if config.option.help or config.option.version:
        return
    _pin(config)
    if _is_worker(config) and _own_gpu(config):
        config.pluginmanager.register(WorkerBenchmarks(), "sdxl-bench-worker-benchmarks")
    elif config.stash[DEVICES]:
        config.pluginmanager.register(ControllerBenchmarks(config), "sdxl-bench-controller-benchmarks")


def _pin(config) -> None:
    """Before anything starts CUDA: a worker takes its own GPU; the controller makes the map it sends workers;
    one process with --gpus takes those GPUs."""
    if _is_worker(config):
        if config.workerinput.get(WORKER_DIST) == "loadgroup":
            config.option.loadgroup = True  # then each grouped test's node id names its group
        devices = config.workerinput.get(WORKER_GPUS) or {}
        worker = config.workerinput["workerid"]
        if worker in devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices[worker]
        config.stash[DEVICES] = devices
        return
    n_workers = getattr(config.option, "numprocesses", None)
    distributed = isinstance(n_workers, int) and n_workers > 0 and config.getoption("dist", "no") != "no"
    config.stash[DEVICES] = workers.worker_devices(_gpus(config), n_workers) if distributed else {}
    if not distributed and config.getoption("--gpus"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(_gpus(config))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """Each worker gets the whole map (to see whether its GPU is shared; a worker that xdist restarts under a
    new id gets a GPU round robin, like the others) and the --dist this plugin chose (a worker reads its
    options from the command line, where a default `loadgroup` is not written)."""
    devices = node.config.stash.get(DEVICES, {})
    if devices:
        worker, gpus = node.gateway.id, _gpus(node.config)
        if worker not in devices:
            devices[worker] = gpus[int(worker[2:]) % len(gpus)]
    node.workerinput[WORKER_GPUS] = dict(devices)
    node.workerinput[WORKER_DIST] = node.config.option.dist


def pytest_report_header(config):
    devices = config.stash.get(DEVICES, {})
    if devices:
        shared = any(workers.contention(devices, worker) for worker in devices)
        return [
            "sdxl-bench: "
            + ", ".join(f"{w} -> GPU {d}" for w, d in devices.items())
            + ("; GPUs shared: timing tests refuse" if shared else "")
        ]
    if config.getoption("--gpus") and not _is_worker(config):
        return [f"sdxl-bench: CUDA_VISIBLE_DEVICES={','.join(_gpus(config))} (--gpus)"]
    return None


def _own_gpu(config) -> bool:
    devices = config.stash.get(DEVICES, {})
    worker = config.workerinput["workerid"]
    return worker in devices and workers.contention(devices, worker) is None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    """A timing test (marked `bench`) fails, in one line, on a GPU that another worker uses too."""
    if item.get_closest_marker("bench") and _is_worker(item.config):
        refusal = workers.contention(item.config.stash.get(DEVICES, {}), item.config.workerinput["workerid"])
        if refusal:
            pytest.fail(refusal, pytrace=False)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """In a `loadgroup` worker, name each grouped test's group in its node id where xdist could not: xdist
    (3.8) writes the `@group` suffix into `item._nodeid`, which pytest 9.2's structured node ids no longer read,
    so every group silently spread over all workers (pytest-xdist#1386). Runs after xdist's own hook and
    leaves ids that already carry the suffix alone."""
    if not (_is_worker(config) and config.getvalue("loadgroup")):
        return
    for item in items:
        groups = {
            str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")
        }
        suffix = "@" + "_".join(sorted(groups))
        if groups and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(item.nodeid + suffix)


class WorkerBenchmarks:
    """In a worker with a GPU of its own: time benchmarks (pytest-benchmark turned itself off under xdist) and
    send each result home in its report; saving, comparing and the table are the controller's."""

    def pytest_sessionstart(self, session):
        config = session.config
        bench = getattr(config, "_benchmarksession", None)
        if (
            bench is None
            or bench.skip
            or (config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))
        ):
            return
        bench.disabled = bench.xdist_warning = False
        bench.save = bench.autosave = bench.json = bench.compare = bench.compare_fail = None
        bench.compared_mapping = {}

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        fixture = getattr(item, "funcargs", {}).get("benchmark") if call.when == "call" else None
        if fixture is not None and fixture.enabled and fixture.stats:
            report.user_properties.append(
                (BENCHMARK, workers.benchmark_record(fixture.stats, workers.plain_nodeid(item.nodeid)))
            )
        return report


class ControllerBenchmarks:
    """In the controller: each worker's benchmark joins this session's benchmarks in collection order (so
    pytest-benchmark saves, compares and prints one run, as on one GPU) and leaves the report's properties."""

    def __init__(self, config):
        self.config = config
        self.order: dict[str, int] = {}  # node id -> its place in the collection

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        if not self.order:
            self.order = {workers.plain_nodeid(nodeid): place for place, nodeid in enumerate(ids)}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report):
        records = [value for key, value in report.user_properties if key == BENCHMARK]
        if records:
            report.user_properties = [(k, v) for k, v in report.user_properties if k != BENCHMARK]
            bench = getattr(self.config, "_benchmarksession", None)
            if bench is not None:
                bench.benchmarks.extend(workers.benchmark_from_record(record) for record in records)
                bench.benchmarks.sort(key=lambda b: self.order.get(b.fullname, len(self.order)))
