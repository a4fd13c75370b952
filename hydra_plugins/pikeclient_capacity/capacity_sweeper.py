"""``python run.py -m hydra/sweeper=capacity llm=... [slo.latency_s=4]``: find the highest request rate a
backend sustains, in one command.

A thin Hydra sweeper: :class:`pikeclient.run.capacity.CapacitySearch` decides each probe, this launches
it as an ordinary job of the sweep (so each probe is a child run of the sweep's parent run in MLflow,
made by ``pikeclient.tracking.sweep``), reads its figures from the job's ``run.json``, and at the end
puts the answer on the parent (:mod:`pikeclient.tracking.capacity`).

A sweep over other keys (``llm=a,b``) searches each combination in turn, all under the one parent run:
one row per combination in the probes table and one line each in the picture; the parent's metrics
are ``capacity/rate`` etc. for a single combination, ``capacity/<label>/rate`` for several (the label:
the combination's values, ``openai`` or ``openai,0.7``).
"""


import itertools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from pikeclient.core.errors import ConfigError
from pikeclient.run.capacity import Capacity, CapacitySearch, CapacitySettings, Probe
from pikeclient.tracking.job_file import read_job_file

log = logging.getLogger(__name__)

# The search sets each probe's load and length; the same keys given on the command line are its own.
_SEARCH_KEYS = ("load", "experiment.max_duration", "experiment.max_requests", "experiment.repeats",
                "experiment.stop_when_saturated", "experiment.max_error_rate")


@dataclass
class CapacitySweeperConf:
    _target_: str = "hydra_plugins.pikeclient_capacity.capacity_sweeper.CapacitySweeper"
    max_probes: int = 8  # probes per backend, the synchronous and the closed-loop one included
    max_time: Optional[float] = None  # noqa: UP045 - OmegaConf 2.3 reads only Optional; seconds per backend
    probe_s: float = 10.0  # seconds each probe sends for
    concurrency: int = 64  # the closed-loop probe's requests in flight
    arrivals: str = "constant"  # the rate probes: constant (evenly spaced) or poisson
    attainment: float = 0.95  # with SLOs: the share of calls that must meet them
    knee_factor: float = 2.0  # without: latency p90 at most this many unloaded medians
    tolerance: float = 0.05  # the search ends when the bracket is this narrow (relative)
    warmup: int = 4  # calls each probe makes and discards first (connections, caches), unless experiment.warmup is given


ConfigStore.instance().store(group="hydra/sweeper", name="capacity", node=CapacitySweeperConf, provider="pikeclient")


class CapacitySweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        try:
            self.settings = CapacitySettings(**settings).check()
        except ConfigError as error:  # one line, exit 1 (the sweep's parent run is ended KILLED at exit)
            raise SystemExit(f"error: {error}") from None
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None
        self.job_index = 0
        self.warmup_given = False  # experiment.warmup on the command line: the user's, for every probe

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)
        for name in ("ttft_s", "tpot_s", "latency_s"):  # before any probe runs
            value = config.slo.get(name)
            if value is not None and not value > 0:
                raise SystemExit(f"error: slo.{name}={value} is out of range: allowed > 0 (seconds) or null")

    def sweep(self, arguments: list[str]) -> list[Capacity]:
        assert self.config is not None
        parsed = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(arguments)
        fixed = [f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed if not o.is_sweep_override()]
        self.warmup_given = any(o.lstrip("+~").startswith("experiment.warmup=") for o in fixed)
        ignored = [o for o in fixed if o.lstrip("+~").startswith(_SEARCH_KEYS)]
        if ignored:
            log.warning("the capacity search sets each probe's load and length: %s left out", ", ".join(ignored))
            fixed = [o for o in fixed if o not in ignored]
        swept = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
                 for o in parsed if o.is_sweep_override()]
        slo_active = any(self.config.slo.get(k) is not None for k in ("ttft_s", "tpot_s", "latency_s")) or bool(
            self.config.slo.get("require_correct"))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        searches: dict[str, tuple[CapacitySearch, Capacity]] = {}
        for combination in itertools.product(*swept):
            label = ",".join(o.partition("=")[2] for o in combination) or str(
                self.config.hydra.runtime.choices.get("llm") or "capacity")
            search = CapacitySearch(self.settings, slo_active)
            searches[label] = (search, self._search(search, [*fixed, *combination], label))
        self._report(searches, sweep_dir)
        return [answer for _, answer in searches.values()]

    def _search(self, search: CapacitySearch, overrides: list[str], label: str) -> Capacity:
        started = time.monotonic()
        while (step := search.next_probe(time.monotonic() - started)) is not None:
            kind, rate = step
            began = time.monotonic()
            ret = self.launcher.launch([[*overrides, *self._probe(kind, rate)]], initial_job_idx=self.job_index)[0]
            self.job_index += 1
            if ret.status == JobStatus.FAILED:
                try:
                    ret.return_value  # noqa: B018 - raises the probe's exception
                except Exception as error:  # noqa: BLE001 - one line for the user, the sweep ends
                    raise SystemExit(f"error: capacity probe {self.job_index - 1} failed: {error}") from None
            job = read_job_file(ret.hydra_cfg.hydra.runtime.output_dir) or {}
            probe = search.add(Probe(kind, rate, dict(job.get("metrics") or {}), job.get("saturated"),
                                     time.monotonic() - began, label, self.job_index - 1))
            log.info("capacity probe %d (%s%s): %.2f answers/s, %s: %s", probe.job, kind,
                     f" {rate:.2f}/s" if rate else "", probe.throughput,
                     "kept up" if probe.kept_up else "did not keep up", probe.why)
        answer = search.result(time.monotonic() - started)
        print(f"capacity of {label}: {answer.describe()}", flush=True)
        return answer

    def _probe(self, kind: str, rate: float | None) -> list[str]:
        s = self.settings
        common = [f"experiment.max_duration={s.probe_s:g}", "experiment.repeats=1000000",
                  "experiment.max_error_rate=1"]  # a probe's failed calls are the search's verdict, not a failed job
        if not self.warmup_given:  # a new client per probe: its first calls would pay for the connections
            common.append(f"experiment.warmup={s.warmup}")
        if kind == "synchronous":
            return ["load=synchronous", *common]
        if kind == "throughput":
            return ["load=concurrency", f"load.concurrency={s.concurrency}", *common]
        window = max(1.0, s.probe_s / 4)
        return [f"load={s.arrivals}", f"load.rate={rate:.4g}", *common, "experiment.stop_when_saturated=true",
                f"experiment.saturation_min_s={window:g}", f"experiment.saturation_window_s={window:g}"]

    def _report(self, searches: dict[str, tuple[CapacitySearch, Capacity]], sweep_dir: Path) -> None:
        """The probes table and the picture in the sweep folder, and with the answer on the parent run."""
        from pikeclient.tracking.sweep import read_parent

        rows = [p.row() for search, _ in searches.values() for p in search.probes]
        single = len(searches) == 1
        metrics: dict[str, float] = {}
        for label, (_, answer) in searches.items():
            metrics.update(answer.metrics("capacity/" if single else f"capacity/{_metric_label(label)}/"))
        parent = read_parent(sweep_dir) if self.config.tracking.enabled else None
        if parent is None and not rows:
            return
        from pikeclient.tracking.capacity import (
            PICTURE,
            PROBES_TABLE,
            capacity_picture,
            log_capacity,
            write_probes_table,
        )

        table = write_probes_table(rows, sweep_dir / PROBES_TABLE)
        picture = capacity_picture({label: ([p.row() for p in search.probes], answer.metrics())
                                    for label, (search, answer) in searches.items()}, sweep_dir / PICTURE)
        log.info("capacity: probes in %s, picture %s", table, picture)
        if parent is not None:
            tags = {f"pikeclient.capacity{'' if single else '.' + _metric_label(label)}": answer.describe()
                    for label, (_, answer) in searches.items()}
            log_capacity(parent, metrics, {**tags, "pikeclient.sweeper": "capacity"}, [table, picture])


def _metric_label(label: str) -> str:
    """A combination's values as a metric name's part (MLflow allows letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
