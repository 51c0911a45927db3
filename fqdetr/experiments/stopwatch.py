"""Wall and CPU seconds per named stage of an experiment (the demo's arms, the study's stages)."""
import contextlib
import logging
import time

log = logging.getLogger(__name__)


class Stopwatch:
    """``with watch.stage("fisher overall"): ...``; ``watch.stages`` {stage: {"wall", "cpu", "runs"}},
    in the order first run, summed over a stage's runs (what a study's runtime estimate scales
    up from a small run). CPU time counts every thread of the process; on a busy machine both
    grow (threads waiting for each other spin), so compare stages of one run rather than runs."""

    def __init__(self):
        self.stages = {}

    @contextlib.contextmanager
    def stage(self, name):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            s = self.stages.setdefault(name, {"wall": 0.0, "cpu": 0.0, "runs": 0})
            s["wall"] += time.perf_counter() - wall
            s["cpu"] += time.process_time() - cpu
            s["runs"] += 1
            log.info("%-36s %7.1f s wall %7.1f s cpu", name, s["wall"], s["cpu"])
