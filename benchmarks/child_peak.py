"""The matmul peak of ``run.py --gpu``, in its own process: ``python3 child_peak.py SPEC_JSON``.

SPEC_JSON (a JSON string, not a file): ``threads``, ``seconds``, ``n``, ``device`` (``cuda`` or ``cpu``),
``dtype`` (``bfloat16``), ``result_file``. Runs :func:`bench_peak.measure_peak` (the best of repeated bursts of four
n x n matmuls, the device synchronised around each burst) and writes its figures to ``result_file``, with the
device's name, memory and compute capability and torch's CUDA version under ``device_info``. Measured in a
process of its own, like each training run: a CUDA context of its own, nothing else on the device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    import torch
    from bench_peak import measure_peak  # benchmarks/ is on PYTHONPATH (bench_runs.child_env)

    peak = measure_peak(spec["threads"], spec["seconds"], spec["n"], spec["device"], spec["dtype"])
    info = {"name": "cpu", "torch": torch.__version__}
    if spec["device"] == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)  # fmt: skip
    Path(spec["result_file"]).write_text(json.dumps({**peak, "device_info": info}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
