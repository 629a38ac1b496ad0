"""Which Ray a driver joins: the job's cluster inside `ray job submit`, never a stray local one."""

import pytest


@pytest.fixture
def calls(monkeypatch):
    import ray

    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    return seen


def test_a_job_driver_joins_the_cluster_it_was_submitted_to_whatever_the_config_says(calls, monkeypatch):
    from actors.cluster import ray_init
    from gdpo.config import load_config

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what the job supervisor gives its driver
    ray_init(load_config())  # the default config: cluster.address null
    ray_init(load_config(None, ["cluster.address=10.9.9.9:6379"]))
    assert [c["address"] for c in calls] == ["10.0.0.5:6379", "10.0.0.5:6379"]
    assert all("num_cpus" not in c for c in calls)  # Ray refuses num_cpus when joining a cluster


def test_without_a_job_the_config_address_or_a_new_local_ray(calls, monkeypatch):
    from actors.cluster import ray_init
    from gdpo.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_init(load_config(None, ["cluster.address=10.9.9.9:6379"]))
    ray_init(load_config(None, ["cluster.num_cpus=3"]))
    assert calls[0]["address"] == "10.9.9.9:6379"
    # "local": a Ray of its own even where `ray start` runs on this machine (None would join that one)
    assert calls[1]["address"] == "local" and calls[1]["num_cpus"] == 3
