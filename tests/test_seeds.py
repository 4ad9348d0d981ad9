"""core/seeds.py (one seed rule for the pack) and core/devices.py (device names checked up front)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lambda_eclipse.core import devices
from lambda_eclipse.core.errors import DeviceError, InputError
from lambda_eclipse.core.seeds import SEED_MAX, check_seed, generator, seed_for, seed_list, torch_seed

TOP = 2**64 - 1


def test_seed_for_is_seed_plus_i_mod_2_64():
    assert seed_for(7, 0) == 7 and seed_for(7, 2) == 9
    assert seed_for(TOP, 1) == 0 and seed_for(TOP, 3) == 2


def test_seed_list_from_a_start_or_a_list():
    assert seed_list(7, 3) == [7, 8, 9]
    assert seed_list(TOP, 2) == [TOP, 0]
    assert seed_list([5, 1, TOP], 3) == [5, 1, TOP]
    assert seed_list(np.int64(4), 2) == [4, 5] and seed_list(torch.tensor(4), 1) == [4]
    assert seed_list(np.array([3, 4]), 2) == [3, 4]
    with pytest.raises(InputError, match=r"Got 2 seeds for a batch of 3 images: give one seed per image, or a single start seed"):
        seed_list([1, 2], 3)
    with pytest.raises(InputError, match=r"seed 2 of 2 -1 is out of range: seeds go from 0 … 18446744073709551615"):
        seed_list([1, -1], 2)
    with pytest.raises(InputError, match=r"batch size must be a whole number ≥ 1; got 0"):
        seed_list(1, 0)


def test_check_seed_states_the_range():
    assert check_seed(0) == 0 and check_seed(TOP) == TOP == SEED_MAX
    with pytest.raises(InputError, match=r"seed -1 is out of range: seeds go from 0 … 18446744073709551615 \(2\*\*64 − 1\)\. Use a seed ≥ 0"):
        check_seed(-1)
    with pytest.raises(InputError, match=r"seed 18446744073709551616 is out of range.*Use a smaller seed \(e\.g\. 0, the same value mod 2\*\*64\)"):
        check_seed(2**64)
    with pytest.raises(InputError, match=r"seed must be a whole number in 0 … 18446744073709551615.*got True \(a bool\)"):
        check_seed(True)
    with pytest.raises(InputError, match=r"--seed must be a whole number in 0 … .*got 1\.5 \(float\)\. Give a whole number"):
        check_seed(1.5, "--seed")
    with pytest.raises(InputError, match=r"got '3' \(str\)"):
        check_seed("3")


def test_torch_seed_is_one_to_one_and_accepted_by_manual_seed():
    for seed in (0, 1, 2**63 - 1, 2**63, TOP):
        value = torch_seed(seed)
        assert value == seed  # identity on 0 … 2**64 − 1: one-to-one
        assert torch.Generator().manual_seed(value).initial_seed() == seed
    with pytest.raises(InputError, match="out of range"):
        torch_seed(-5)
    a = torch.randn(3, generator=generator(TOP))
    b = torch.randn(3, generator=torch.Generator().manual_seed(TOP))
    assert torch.equal(a, b)


# -- devices --------------------------------------------------------------------------------------------------

@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


def test_cpu_and_auto(no_gpu):
    assert devices.check_device("cpu") == "cpu" and devices.check_device(" CPU ") == "cpu"
    assert devices.check_device("auto") == "cpu" and devices.check_device(None) == "cpu"


def test_cuda_without_gpu_on_a_cpu_build(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(DeviceError, match=r"--device cuda: no CUDA GPU is visible to torch \(torch .*, a CPU-only build\); use --device cpu or install a CUDA build of torch: see README Install"):
        devices.check_device("cuda")


def test_cuda_without_gpu_on_a_cuda_build(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    with pytest.raises(DeviceError, match=r"no CUDA GPU is visible to torch \(torch .* built for CUDA 12\.1\); use --device cpu, or check the GPU driver \(nvidia-smi\) and .*CUDA_VISIBLE_DEVICES"):
        devices.check_device("cuda:0")


def test_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.check_device("auto") == "cuda"
    assert devices.check_device("CUDA:1") == "cuda:1" and devices.check_device("cuda") == "cuda"
    with pytest.raises(DeviceError, match=r"--device cuda:3: torch sees 2 CUDA GPUs \(cuda:0 … cuda:1\)\. Use one of those, or --device cuda"):
        devices.check_device("cuda:3")


def test_mps_unavailable(no_gpu):
    with pytest.raises(DeviceError, match=r"--device mps: MPS \(Apple-silicon GPU\) is not available to torch.*Use --device cpu"):
        devices.check_device("mps")


def test_unknown_device_lists_the_choices(no_gpu):
    with pytest.raises(DeviceError, match=r"--device 'tpu9' is not a device name\. Choose auto, cpu, cuda, cuda:N or mps"):
        devices.check_device("tpu9")
    with pytest.raises(DeviceError, match=r"device 'cuda:x' is not a device name"):
        devices.check_device("cuda:x", what="device")
