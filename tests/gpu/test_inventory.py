"""GPU inventory: NVML read correctly, failures reported honestly, files validated.

``detect()`` takes the NVML module as a parameter; here it gets a small
NVML-shaped fake (a unit test of this one layer: the real driver is checked
on a GPU machine by ``scripts/device_nvml_check.py``).  The fake raises the
real ``pynvml.NVMLError`` types, so the error paths are the ones a driver
takes.  On this machine there is no driver, and the real ``detect()`` must
say so rather than fail.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
import pynvml
import pytest

from p2pgpu.gpu import Inventory, InventoryError, detect, from_file, inventory_file_bytes_max, parse_inventory

MIB = 1024 * 1024


@dataclass
class FakeDevice:
    name: str | bytes = "NVIDIA H100 80GB HBM3"
    total_bytes: int = 81559 * MIB
    cc: tuple[int, int] = (9, 0)
    uuid: str | bytes = "GPU-5c3b2f5e-1d2a-4b7c-9e8f-0a1b2c3d4e5f"
    util_pct: int | None = 7  # None: not supported on this device


@dataclass
class _Mem:
    total: int
    free: int
    used: int


@dataclass
class _Util:
    gpu: int
    memory: int


@dataclass
class FakeNVML:
    """The part of pynvml's API that ``detect()`` uses."""

    devices: list[FakeDevice] = field(default_factory=list)
    driver: str | bytes = "550.54.15"
    cuda: int = 12040
    init_error: int | None = None
    fail_in: str = ""  # name of a call that raises NVMLError
    calls: list[str] = field(default_factory=list)

    NVMLError = pynvml.NVMLError

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_in:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._call("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._call("nvmlSystemGetCudaDriverVersion")
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeDevice:
        self._call("nvmlDeviceGetHandleByIndex")
        return self.devices[i]

    def nvmlDeviceGetName(self, h: FakeDevice) -> str | bytes:
        self._call("nvmlDeviceGetName")
        return h.name

    def nvmlDeviceGetMemoryInfo(self, h: FakeDevice) -> _Mem:
        self._call("nvmlDeviceGetMemoryInfo")
        return _Mem(total=h.total_bytes, free=h.total_bytes // 2, used=h.total_bytes // 2)

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeDevice) -> tuple[int, int]:
        self._call("nvmlDeviceGetCudaComputeCapability")
        return h.cc

    def nvmlDeviceGetUUID(self, h: FakeDevice) -> str | bytes:
        self._call("nvmlDeviceGetUUID")
        return h.uuid

    def nvmlDeviceGetUtilizationRates(self, h: FakeDevice) -> _Util:
        self._call("nvmlDeviceGetUtilizationRates")
        if h.util_pct is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return _Util(gpu=h.util_pct, memory=0)


TWO = [
    FakeDevice(),
    FakeDevice(name="NVIDIA A10", total_bytes=24564 * MIB - 1, cc=(8, 6), uuid="GPU-aaaaaaaa-0000",
               util_pct=100),
]


def test_two_gpus_reported_correctly() -> None:
    nvml = FakeNVML(devices=list(TWO))
    inv = detect(nvml)
    assert inv.source == "nvml" and not inv.simulated and inv.reason == ""
    assert (inv.driver_version, inv.cuda_version) == ("550.54.15", "12.4")
    h100, a10 = inv.gpus
    assert (h100.model, h100.memory_mb, h100.compute_capability, h100.utilization_pct) == (
        "NVIDIA H100 80GB HBM3", 81559, "9.0", 7)
    assert (a10.model, a10.memory_mb, a10.compute_capability, a10.utilization_pct) == ("NVIDIA A10", 24563,
                                                                                       "8.6", 100)
    assert h100.driver_version == "550.54.15" and h100.cuda_version == "12.4"
    assert h100.gpu_class == "nvidia-h100-80gb-hbm3/80gb"
    assert nvml.calls[0] == "nvmlInit" and nvml.calls[-1] == "nvmlShutdown"
    assert nvml.calls.count("nvmlShutdown") == 1


def test_uuid_is_hashed_and_never_leaked() -> None:
    inv = detect(FakeNVML(devices=list(TWO)))
    uuid = TWO[0].uuid
    assert isinstance(uuid, str)
    assert inv.gpus[0].uuid_hash == hashlib.sha256(uuid.encode()).hexdigest()[:32]
    assert inv.gpus[0].uuid_hash != inv.gpus[1].uuid_hash
    text = json.dumps(inv.to_json())
    assert uuid not in text and "5c3b2f5e" not in text and "aaaaaaaa" not in text


@pytest.mark.parametrize(("raw", "text"), [(12040, "12.4"), (12000, "12.0"), (11080, "11.8"), (12090, "12.9"),
                                           (13000, "13.0"), (12100, "12.10")])
def test_cuda_version(raw: int, text: str) -> None:
    assert detect(FakeNVML(devices=[FakeDevice()], cuda=raw)).cuda_version == text


def test_bytes_names_from_old_bindings() -> None:
    nvml = FakeNVML(devices=[FakeDevice(name=b"Tesla T4", uuid=b"GPU-bytes", cc=(7, 5))], driver=b"535.1")
    inv = detect(nvml)
    assert inv.gpus[0].model == "Tesla T4" and inv.driver_version == "535.1"
    assert inv.gpus[0].uuid_hash == hashlib.sha256(b"GPU-bytes").hexdigest()[:32]


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
                                  pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_ERROR_UNKNOWN])
def test_nvml_error_at_init_gives_honest_empty_inventory(code: int) -> None:
    nvml = FakeNVML(devices=list(TWO), init_error=code)
    inv = detect(nvml)
    assert inv.gpus == () and inv.source == "none" and not inv.simulated
    assert "NVML" in inv.reason and str(pynvml.NVMLError(code)) in inv.reason
    assert nvml.calls == ["nvmlInit"]  # nothing else asked of a driver that did not start


@pytest.mark.parametrize("call", ["nvmlSystemGetDriverVersion", "nvmlSystemGetCudaDriverVersion",
                                  "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
                                  "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetCudaComputeCapability",
                                  "nvmlDeviceGetUUID"])
def test_error_in_a_query_gives_empty_inventory_with_reason(call: str) -> None:
    nvml = FakeNVML(devices=list(TWO), fail_in=call)
    inv = detect(nvml)
    assert inv.gpus == () and inv.source == "none"
    assert "NVML query failed" in inv.reason and "GPU is lost" in inv.reason
    assert nvml.calls[-1] == "nvmlShutdown"  # NVML is always shut down after a successful init


def test_error_at_shutdown_is_not_fatal() -> None:
    inv = detect(FakeNVML(devices=list(TWO), fail_in="nvmlShutdown"))
    assert len(inv.gpus) == 2


def test_utilization_unsupported_reads_as_zero() -> None:
    inv = detect(FakeNVML(devices=[FakeDevice(util_pct=None), FakeDevice(util_pct=55)]))
    assert [g.utilization_pct for g in inv.gpus] == [0, 55]
    assert inv.reason == ""


def test_utilization_out_of_range_is_clamped() -> None:
    inv = detect(FakeNVML(devices=[FakeDevice(util_pct=250), FakeDevice(util_pct=-3)]))
    assert [g.utilization_pct for g in inv.gpus] == [100, 0]


def test_more_than_16_gpus() -> None:
    devices = [FakeDevice(uuid=f"GPU-{i}") for i in range(20)]
    inv = detect(FakeNVML(devices=devices))
    assert len(inv.gpus) == 16
    assert "16" in inv.reason and "20" in inv.reason
    assert len({g.uuid_hash for g in inv.gpus}) == 16


def test_no_devices() -> None:
    inv = detect(FakeNVML(devices=[]))
    assert inv.gpus == () and inv.source == "nvml" and "no devices" in inv.reason


def test_long_model_name_is_cut_to_the_advert_limit() -> None:
    inv = detect(FakeNVML(devices=[FakeDevice(name="X" * 100)]))
    assert inv.gpus[0].model == "X" * 64


@pytest.mark.parametrize("device", [FakeDevice(name=""), FakeDevice(total_bytes=MIB - 1),
                                    FakeDevice(cc=(100, 0))],
                         ids=["no name", "under 1 MiB", "odd capability"])
def test_a_device_the_advert_refuses_gives_empty_inventory(device: FakeDevice) -> None:
    nvml = FakeNVML(devices=[FakeDevice(), device])
    inv = detect(nvml)
    assert inv.gpus == () and inv.source == "none" and "invalid device" in inv.reason
    assert nvml.calls[-1] == "nvmlShutdown"


def test_real_detect_on_this_machine_reports_no_nvml() -> None:
    inv = detect()
    assert inv.gpus == () and inv.source == "none" and not inv.simulated
    assert "NVML" in inv.reason


def test_detect_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    inv = detect()
    assert inv.gpus == () and "pynvml not installed" in inv.reason


# --- inventory files (--gpus-from) ----------------------------------------------------


def _write(tmp_path: Path, content: str | bytes) -> Path:
    p = tmp_path / "gpus.json"
    if isinstance(content, str):
        p.write_text(content)
    else:
        p.write_bytes(content)
    return p


def test_file_round_trips_what_gpus_json_prints(tmp_path: Path) -> None:
    real = detect(FakeNVML(devices=list(TWO)))
    inv = from_file(_write(tmp_path, json.dumps(real.to_json())))
    assert inv.gpus == real.gpus
    assert inv.source == "file" and inv.simulated
    assert (inv.driver_version, inv.cuda_version) == ("550.54.15", "12.4")


def test_minimal_hand_written_file(tmp_path: Path) -> None:
    doc = {"gpus": [{"model": "NVIDIA A100-SXM4-40GB", "memory_mb": 40960, "compute_capability": "8.0",
                     "index": 0, "comment": "extra keys are ignored"}]}
    inv = from_file(_write(tmp_path, json.dumps(doc)))
    assert inv.gpus[0].model == "NVIDIA A100-SXM4-40GB" and inv.gpus[0].memory_mb == 40960
    assert inv.gpus[0].uuid_hash == "" and inv.simulated and inv.reason == ""


def test_file_with_no_gpus(tmp_path: Path) -> None:
    inv = from_file(_write(tmp_path, '{"gpus": []}'))
    assert inv.gpus == () and inv.simulated and "no GPUs" in inv.reason


GOOD_GPU = {"model": "T4", "memory_mb": 15360, "compute_capability": "7.5"}
BAD_FILES: list[tuple[str, str | bytes, str]] = [
    ("not json", "{gpus: [", "not valid JSON"),
    ("empty", "", "not valid JSON"),
    ("not utf-8", b'{"gpus": ["\xff"]}', "not valid JSON"),
    ("deeply nested", "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("huge integer", '{"gpus": [{"memory_mb": ' + "9" * 5000 + "}]}", "not valid JSON"),
    ("a list", "[]", '"gpus" list'),
    ("no gpus key", '{"gpu": []}', '"gpus" list'),
    ("gpus not a list", '{"gpus": {}}', '"gpus" list'),
    ("gpu not an object", '{"gpus": [1]}', "gpus[0] must be an object"),
    ("missing memory", json.dumps({"gpus": [{"model": "T4", "compute_capability": "7.5"}]}),
     "memory_mb: missing"),
    ("missing model", json.dumps({"gpus": [{"memory_mb": 1, "compute_capability": "7.5"}]}),
     "model: missing"),
    ("memory as float", json.dumps({"gpus": [{**GOOD_GPU, "memory_mb": 15360.0}]}), "memory_mb"),
    ("memory as bool", json.dumps({"gpus": [{**GOOD_GPU, "memory_mb": True}]}), "memory_mb"),
    ("memory zero", json.dumps({"gpus": [{**GOOD_GPU, "memory_mb": 0}]}), "memory_mb"),
    ("bad capability", json.dumps({"gpus": [{**GOOD_GPU, "compute_capability": "sm75"}]}), "gpus[0]"),
    ("17 gpus", json.dumps({"gpus": [GOOD_GPU] * 17}), "at most 16"),
]


@pytest.mark.parametrize(("content", "message"), [r[1:] for r in BAD_FILES], ids=[r[0] for r in BAD_FILES])
def test_bad_inventory_files(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(InventoryError) as info:
        from_file(path)
    assert message in str(info.value)


def test_file_too_large(tmp_path: Path) -> None:
    # Valid JSON, just too big: refused by size before it is parsed.
    doc = json.dumps({"gpus": [], "pad": "x" * inventory_file_bytes_max})
    with pytest.raises(InventoryError, match="larger than"):
        from_file(_write(tmp_path, doc))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="No such file"):
        from_file(tmp_path / "nope.json")


def test_parse_inventory_names_where(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="^cluster.toml: "):
        parse_inventory({"gpus": "x"}, "cluster.toml")
    assert isinstance(parse_inventory({"gpus": [GOOD_GPU]}), Inventory)
