"""Hydra's submitit launchers (hydra/launcher=local and =slurm), with jobs whose process is
killed outright recorded as failed jobs instead of ending the sweep.

A job that fails in Python is recorded by the job itself (cifar_cnn/jobs.py) and returns NaN.
A job killed by SIGKILL (the kernel's out-of-memory killer, SLURM's memory limit) runs no
more code: submitit finds no result and `Job.results()` raises, and Hydra's launcher, which
reads the jobs' results one after another, ends the sweep there, without the other jobs'
results or the sweep's summary. These launchers read each job's result on its own: such a
job gets `"status": "failed"` in its metrics.json and NaN as its result, and the sweep goes
on to its end (SweepSummary then exits with status 1, naming it).
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    BaseSubmititLauncher,
    LocalLauncher,
    SlurmLauncher,
)
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cifar_cnn.files import record_failure

log = logging.getLogger(__name__)

# Seconds submitit waits for a finished job's result file to appear (its default: 15, for a
# cluster's network file system); a local job writes it on this machine's disk.
LOCAL_RESULT_WAIT_S = 2


class JobsThatDieFail(BaseSubmititLauncher):
    """BaseSubmititLauncher.launch, but for its last step: each job's result read on its own."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit  # lazily, as Hydra's launcher: plugin discovery stays fast

        assert self.config is not None and len(job_overrides) > 0
        init_keys = {"max_num_timeout"}
        init_params = {"folder": self.params["submitit_folder"]} | {
            f"{self._EXECUTOR}_{key}": value
            for key, value in self.params.items()
            if key in init_keys
        }
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        base_params = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                key if key in base_params else f"{self._EXECUTOR}_{key}": value
                for key, value in self.params.items()
                if key not in init_keys | {"submitit_folder"}
            }
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        job_params = []
        for number, overrides in zip(numbers, job_overrides, strict=True):
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", number,
                               f"job_id_for_{number}", Singleton.get_state()))  # fmt: skip
        jobs = executor.map_array(self, *zip(*job_params, strict=True))
        return [
            self._result(job, list(overrides), number)
            for job, overrides, number in zip(jobs, job_overrides, numbers, strict=True)
        ]

    def _result(self, job: Any, overrides: list[str], number: int) -> JobReturn:
        """The job's own result; for a job whose process ended without one, a failed job's."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        if self._EXECUTOR == "local":
            job._results_timeout_s = LOCAL_RESULT_WAIT_S
        try:
            return job.results()[0]
        except FailedJobError:  # the job raised: its own error, as Hydra's launcher gives it
            raise
        except UncompletedJobError:
            pass
        folder = self._job_folder(overrides, number)
        reason = (
            f"the job's process ended without a result (submitit: state {job.state}), killed "
            "by a signal such as SIGKILL, which the kernel's out-of-memory killer sends; its "
            f"output: {job.paths.stderr}"
        )
        log.error("job %d failed: %s", number, reason)
        if (folder / ".hydra").is_dir():  # else it died before Hydra made its folder
            record_failure(folder, "failed", f"KilledJob: {reason}")
        return JobReturn(
            overrides=overrides,
            working_dir=str(folder),
            task_name=str(self.config.hydra.job.name),
            status=JobStatus.COMPLETED,  # a failed job's result, as train_in_sweep returns it
            _return_value=math.nan,
        )

    def _job_folder(self, overrides: list[str], number: int) -> Path:
        """Where Hydra ran job `number`: hydra.sweep.dir / hydra.sweep.subdir."""
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        try:
            config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(config.hydra.job):
                config.hydra.job.num = number
            return sweep_dir / str(config.hydra.sweep.subdir)
        except OmegaConfBaseException:  # a subdir that needs Hydra's runtime to resolve
            return sweep_dir / str(number)


class LocalJobsThatDieFail(JobsThatDieFail, LocalLauncher):
    """hydra/launcher=local."""


class SlurmJobsThatDieFail(JobsThatDieFail, SlurmLauncher):
    """hydra/launcher=slurm."""
