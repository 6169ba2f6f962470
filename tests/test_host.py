"""The machine record that results carry (compare.json, metrics.json, benchmark JSON)."""

import torch

from diffdis.utils.host import cpu_model, describe_host, host_record

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu avx avx2

processor\t: 1
model name\t: AMD EPYC 7B13
"""


def test_cpu_model_reads_the_first_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert cpu_model(info) == "AMD EPYC 7B13"


def test_cpu_model_without_cpuinfo_falls_back_to_a_name(tmp_path):
    name = cpu_model(tmp_path / "missing")
    assert isinstance(name, str) and name.strip()
    (tmp_path / "empty").write_text("processor\t: 0\nmodel name\t:\n")
    assert cpu_model(tmp_path / "empty").strip()  # an empty model name is not taken


def test_host_record_and_its_line():
    record = host_record(torch.device("cpu"))
    assert set(record) == {"cpu", "cpu_capability", "usable_cpus", "torch"}  # no GPU entry for a CPU device
    assert record["torch"] == torch.__version__
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["usable_cpus"] >= 1
    line = describe_host({"cpu": "AMD EPYC", "cpu_capability": "AVX2", "usable_cpus": 2, "torch": "2.13.0"})
    assert line == "AMD EPYC (AVX2), 2 CPUs, torch 2.13.0"
    gpu = describe_host({"cpu": "X", "cpu_capability": "AVX512", "usable_cpus": 1, "gpu": "NVIDIA H100", "torch": "2"})
    assert gpu == "X (AVX512), 1 CPU, NVIDIA H100, torch 2"
