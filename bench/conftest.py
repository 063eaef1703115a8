"""Benchmarks record the software and device they ran on in pytest-benchmark's machine_info (read by
bench/summarize.py when it writes bench/results/)."""
import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    machine_info["tessera"] = info
