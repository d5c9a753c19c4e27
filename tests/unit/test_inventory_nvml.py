"""cluster: auto on a machine whose NVIDIA driver is missing (a CPU machine) or failing (an error).

[Note: no GPU or a broken driver] in cluster/inventory.py. The real nvidia-ml-py module is used
with its functions replaced, so the error classes are the ones a real driver raises.
"""

import sys
from pathlib import Path

import pynvml
import pytest

from memtrain.cluster import local_node_spec
from memtrain.errors import UserError
from memtrain.runtime import cli

ROOT = Path(__file__).resolve().parents[2]


def _raise(error_cls):
    def f(*args):
        raise error_cls()

    return f


@pytest.fixture
def calls(monkeypatch):
    """nvmlInit/nvmlShutdown recorded; one GPU whose handle is 'gpu0'."""
    seen = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: seen.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: seen.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: "gpu0")
    return seen


@pytest.mark.parametrize("error_cls", [pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded])
def test_no_nvidia_driver_is_a_cpu_machine(monkeypatch, error_cls):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(error_cls))
    assert [d.kind for d in local_node_spec().devices] == ["cpu"]


def test_no_nvml_module_is_a_cpu_machine(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert [d.kind for d in local_node_spec().devices] == ["cpu"]


def test_a_driver_that_sees_no_gpu_is_a_cpu_machine(monkeypatch, calls):
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 0)
    assert [d.kind for d in local_node_spec().devices] == ["cpu"]
    assert calls == ["init", "shutdown"]


@pytest.mark.parametrize("error_cls", [pynvml.NVMLError_Unknown, pynvml.NVMLError_LibRmVersionMismatch,
                                       pynvml.NVMLError_NoPermission])
def test_a_driver_that_fails_to_start_is_an_error_naming_it(monkeypatch, error_cls):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(error_cls))
    with pytest.raises(UserError, match=rf"cluster\.auto: .*NVIDIA driver failed \(nvmlInit: {error_cls.__name__}") as e:
        local_node_spec()
    assert "nvidia-smi" in str(e.value) and "cluster.auto: false" in str(e.value)


@pytest.mark.parametrize("query", ["nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo"])
def test_a_gpu_query_that_fails_is_an_error_and_nvml_is_shut_down(monkeypatch, calls, query):
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "NVIDIA A10")
    monkeypatch.setattr(pynvml, query, _raise(pynvml.NVMLError_GpuIsLost))
    with pytest.raises(UserError, match=r"cluster\.auto: .*\(reading the GPUs: NVMLError_GpuIsLost"):
        local_node_spec()
    assert calls == ["init", "shutdown"]


def test_memtrain_plan_exits_2_naming_the_driver_failure(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(pynvml.NVMLError_LibRmVersionMismatch))
    monkeypatch.delenv("MEMTRAIN_DEBUG", raising=False)
    rc = cli.main(["plan", str(ROOT / "examples" / "tiny-cpu.yaml"), "--set", f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("memtrain: error: cluster.auto:") and "NVMLError_LibRmVersionMismatch" in err
    assert "Traceback" not in err
