"""A trial whose worker lives on another host is taken for dead after STALE_AFTER_S without a heartbeat, and
queued again; if that worker was alive after all, its late result is dropped with one line, never a crash."""
from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState

from pipeline.sweeps.storage import STALE_AFTER_S, recover_interrupted, trials_used
from pipeline.sweeps.trials import tell


def _study_with_a_trial_elsewhere(silent_for_s: float):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)})
    trial.set_user_attr("worker_host", "another-host")
    trial.set_user_attr("worker_pid", 1)
    trial.set_user_attr("heartbeat", time.time() - silent_for_s)
    return study, trial


def test_a_trial_on_another_host_is_taken_for_dead_only_after_its_heartbeats_stop_for_the_stale_window():
    study, _ = _study_with_a_trial_elsewhere(STALE_AFTER_S - 30)
    assert recover_interrupted(study) == []  # a beat or so late: still alive
    study, trial = _study_with_a_trial_elsewhere(STALE_AFTER_S + 1)
    assert recover_interrupted(study) == [trial.number]
    [retry] = study.get_trials(states=(TrialState.WAITING,))
    assert retry.system_attrs["fixed_params"] == trial.params and retry.user_attrs["retry_of"] == trial.number
    assert trials_used(study) == 0  # the interrupted trial does not count against the budget


def test_the_late_result_of_a_trial_taken_for_dead_is_dropped_with_one_line(capsys):
    study, trial = _study_with_a_trial_elsewhere(STALE_AFTER_S + 1)
    recover_interrupted(study)
    tell(study, trial, [0.9])  # its worker was alive after all, and finishes
    assert study.trials[trial.number].state == TrialState.FAIL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"trial {trial.number} was taken for dead" in err[0] and "retry counts" in err[0]


def test_a_trial_still_running_is_told_as_usual():
    study, trial = _study_with_a_trial_elsewhere(0)
    tell(study, trial, [0.9])
    assert study.trials[trial.number].state == TrialState.COMPLETE and study.trials[trial.number].value == 0.9
