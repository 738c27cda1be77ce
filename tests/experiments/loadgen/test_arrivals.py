"""Arrival schedules: the drawn inter-arrival times follow the configured distribution."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from experiments.loadgen.arrivals import interarrival_distribution, schedule
from tests.helpers.experiment_configs import workload_cfg


@pytest.mark.parametrize("arrival,burst", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 2.0)])
def test_schedules_pass_ks(arrival, burst):
    cfg = workload_cfg(arrival=arrival, rate=5.0, burstiness=burst, seed=3)
    gaps = np.diff(schedule(cfg, 2000))
    assert stats.kstest(gaps, interarrival_distribution(cfg).cdf).pvalue > 0.01
    # and the test has power: the other distribution fails
    other = workload_cfg(arrival="gamma", rate=5.0, burstiness=burst * 4, seed=3)
    assert stats.kstest(gaps, interarrival_distribution(other).cdf).pvalue < 0.01
