"""Edge devices: device selection, precision choice, micro-batches (a memory cap that changes
nothing), node settings. The CUDA branches run on CPU with torch.cuda's answers patched;
the real CUDA path is checked by benchmarks/cuda_check.py where a GPU is available."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedpgen.client.device import Device
from fedpgen.client.node import node_settings
from fedpgen.shared.accelerator import autocast_dtype, select_device
from fedpgen.shared.adapters import active
from fedpgen.shared.population import ensure_population
from fedpgen.shared.privacy.mechanism import NoPrivacy, RecordDP


def test_auto_is_cpu_without_cuda_and_an_absent_gpu_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu") and select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'device'.*CUDA is not available"):
        select_device("cuda:0")
    with pytest.raises(ValueError, match="valid: auto | cpu"):
        select_device("gpu0")


def test_cuda_selection_and_precision_when_a_gpu_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("auto") == torch.device("cuda", 0)
    assert select_device("cuda") == torch.device("cuda", 0) and select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 GPU"):
        select_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert autocast_dtype(torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert autocast_dtype(torch.device("cuda", 0)) == torch.float16
    assert autocast_dtype(torch.device("cpu")) is None


@pytest.mark.parametrize("private", [False, True])
def test_micro_batches_give_the_same_step_as_whole_batches(make_cfg, task_case, private: bool) -> None:
    # Prepare: one fixed batch of 6 records; σ = 0 so a DP step is deterministic (clipped mean)
    cfg = make_cfg(dp="sigma", dp_noise_multiplier=0.0, **task_case)
    results = []
    for micro in (0, 4, 1):
        d = Device(cfg, user_dir=ensure_population(cfg)[0], state_dir=Path(cfg.run_dir) / f"s{micro}",
                   micro_batch=micro)
        batch = d.data.train[:6]
        names = d.sets.shared_trainable
        with active(d.model, ["shared"], names) as params:
            mech = RecordDP(noise_multiplier=0.0, clip=0.05, accountant="prv", history=[]) if private else NoPrivacy()
            d.model.train()
            session = mech.open(d.model, params, d.data.train, batch_size=6, lr=1e-2, gen=torch.Generator(),
                                micro_batch=micro)
            # Execute
            session.step(lambda b: d.task.per_record_loss(d.model, b), batch)
            grads = {n: p.grad.detach().clone() for n, p in zip(names, params, strict=True)}
            session.close()
        if private:
            assert [steps for _, _, steps in mech.history] == [1], "one accounted step per Poisson batch"
        results.append(grads)
    # Assert: the gradient the optimizer stepped on is the same (up to float summation order)
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], atol=1e-8, rtol=1e-4)
    assert any(float(v.abs().max()) > 0 for v in results[0].values())


def test_node_settings_are_validated(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg()
    node = node_settings({"data-dir": str(tmp_path / "u"), "state-dir": str(tmp_path / "s"), "device": "cuda:0",
                          "micro-batch": 2, "key-file": str(tmp_path / "k")}, cfg)
    assert (node.device, node.micro_batch, node.key_file, node.client_index) == ("cuda:0", 2, tmp_path / "k", -1)
    with pytest.raises(ValueError, match="unknown keys \\['data_dir'\\]"):
        node_settings({"data_dir": "x"}, cfg)
    with pytest.raises(ValueError, match="needs a 'state-dir'"):
        node_settings({"data-dir": "x"}, cfg)
    with pytest.raises(ValueError, match="'micro-batch'"):
        node_settings({"data-dir": "x", "state-dir": "y", "micro-batch": -1}, cfg)
    with pytest.raises(ValueError, match="needs data-dir"):
        node_settings({}, cfg)


_HEAP_PROBE = """
import ctypes, sys
from fedpgen.shared.accelerator import keep_freed_heap
set_ = keep_freed_heap(int(sys.argv[1]))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
size = 24 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
held = rss()
libc.free(block)
print(set_, held - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize(("mib", "kept"), [(0, False), (64, True)])
def test_a_device_process_keeps_freed_heap_when_configured(mib: int, kept: bool) -> None:
    """cpu-heap-keep-mib: a 24 MiB block, freed, stays in the process (no page faults to get it
    back at the next step) where glibc's defaults hand it back to the OS at once."""
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, str(mib)], capture_output=True, text=True, check=True)
    set_, returned = out.stdout.split()
    assert set_ == str(kept)
    if kept:
        assert int(returned) < 1 << 20
    else:
        assert int(returned) > 20 << 20


def test_config_bounds_the_kept_heap(make_cfg) -> None:
    for bad in (-1, 5000):
        with pytest.raises(ValueError, match="cpu-heap-keep-mib"):
            make_cfg(cpu_heap_keep_mib=bad)
