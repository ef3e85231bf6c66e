"""Tests for jaxrl_llm.parallel.mesh: mesh shapes, bad shapes, init_distributed."""

import jax
import pytest
from jax.sharding import AxisType

from jaxrl_llm.parallel import MESH_AXES, data_parallel_size, init_distributed, make_mesh


def test_eight_simulated_devices():
    assert jax.device_count() == 8, "tests/conftest.py should force 8 CPU devices"


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ((-1, 1, 1), (8, 1, 1)),
        ((2, 4, 1), (2, 4, 1)),
        ((2, 2, 2), (2, 2, 2)),
        ((2, -1, 2), (2, 2, 2)),
        ((1, 1, -1), (1, 1, 8)),
    ],
)
def test_make_mesh_shapes(sizes, expected):
    mesh = make_mesh(*sizes)
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.shape[a] for a in MESH_AXES) == expected
    assert mesh.devices.size == 8
    assert set(mesh.axis_types) == {AxisType.Auto}
    assert data_parallel_size(mesh) == expected[0] * expected[1]


def test_make_mesh_single_device():
    one = jax.devices()[:1]
    mesh = make_mesh(1, 1, 1, devices=one)
    assert tuple(mesh.shape.values()) == (1, 1, 1)
    assert list(mesh.devices.flat) == one
    # -1 also resolves against the given devices
    assert make_mesh(devices=jax.devices()[:4]).shape["data"] == 4


def test_make_mesh_explicit_axis_types_opt_in():
    mesh = make_mesh(2, 2, 2, axis_types=AxisType.Explicit)
    assert set(mesh.axis_types) == {AxisType.Explicit}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data=3, fsdp=1, tensor=1), "must equal the number of devices"),
        (dict(data=2, fsdp=2, tensor=1), "must equal the number of devices"),
        (dict(data=-1, fsdp=3, tensor=1), "does not divide"),
        (dict(data=-1, fsdp=-1, tensor=1), "at most one"),
        (dict(data=0, fsdp=1, tensor=1), "data"),
        (dict(data=1, fsdp=1, tensor=-2), "tensor"),
        (dict(devices=[]), "devices"),
        (dict(data=2, fsdp=4, tensor=1, axis_types=(AxisType.Auto,)), "axis_types"),
    ],
)
def test_make_mesh_bad_shapes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**kwargs)


def test_init_distributed_is_noop_on_single_host(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "OMPI_MCA_orte_hnp_uri",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert init_distributed() is False
    assert init_distributed(num_processes=1) is False
    # a single-task SLURM job is a single host too
    assert init_distributed(env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is False
    assert calls == []
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1


def test_init_distributed_reads_env_and_detects_clusters(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert init_distributed(env=env) is True
    assert calls[-1]["coordinator_address"] == "10.0.0.1:1234"
    assert calls[-1]["num_processes"] == 4 and calls[-1]["process_id"] == 2
    # SLURM with several tasks: JAX's own auto-detection (no explicit arguments)
    assert init_distributed(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}) is True
    assert calls[-1]["coordinator_address"] is None and calls[-1]["num_processes"] is None
    assert init_distributed(env={"TPU_WORKER_HOSTNAMES": "h0,h1"}) is True
    assert init_distributed(env={}, auto_detect=True) is True
    assert len(calls) == 4
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        init_distributed(env={"JAX_NUM_PROCESSES": "two"})
