"""Run an experiment: ``python run.py [llm=...] [sampling.temperature=...]``; ``-m`` for a sweep."""

import sys

import hydra
from omegaconf import DictConfig

from pikeclient.cli import check_runs_dir, refuse_secret_overrides, resume_in_place
from pikeclient.cli import main as run_job
from pikeclient.config.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="pikeclient/conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    refuse_secret_overrides(sys.argv[1:])  # before Hydra saves the overrides anywhere
    check_runs_dir(sys.argv[1:])  # before Hydra creates the job's folder there
    sys.argv[1:] = resume_in_place(sys.argv[1:])  # a resumed run completes in its own folder
    try:
        main()
    except KeyboardInterrupt:  # between a sweep's jobs, or in a launcher's workers (a job says what it left)
        from pikeclient.tracking.sweep import interrupted_sweep_note

        print(interrupted_sweep_note(), file=sys.stderr)
        sys.exit(130)
