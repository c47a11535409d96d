"""The GPU benchmarks' card and command line (bench/gpu.sh runs each bench/gpu_*.py).

The card's name comes from nvidia-smi (JAX's device kind where it is missing); its memory
bandwidth from the spec-sheet table below (the bound of bench/gpu_sampling.py), matched by
substring in order, overridable with --bandwidth_tb_s. Dense bf16 peaks for MFU are
ssr_jax.train.metrics.PEAK_FLOPS_BY_KIND's (the one table the trainer's MFU uses too).

Flags of every GPU benchmark: --smoke (tiny shapes, seconds: checks the script end to end on
a CPU), --quick (fewer repetitions), --json=PATH, --bandwidth_tb_s=X.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

# HBM bandwidth in bytes/s by nvidia-smi name (spec sheets); first substring match wins.
BANDWIDTH_BY_NAME = (
        ("H200", 4.8e12),
        ("H100 NVL", 3.9e12),
        ("H100 PCIe", 2.0e12),
        ("H100", 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
        ("A100-SXM4-80GB", 2.039e12),
        ("A100 80GB PCIe", 1.935e12),
        ("A100", 1.555e12),  # 40 GB, SXM4 or PCIe
        ("L4", 0.3e12),
)


def card_name() -> str:
    """nvidia-smi's name of GPU 0, else JAX's device kind (e.g. 'cpu')."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True)
            if out.stdout.strip():
                return out.stdout.strip().splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    import jax  # pylint: disable=import-outside-toplevel
    return jax.devices()[0].device_kind


def bandwidth(name: str, override_tb_s: Optional[float] = None) -> Optional[float]:
    """Bytes/s of the card called `name` (None when unknown and not overridden)."""
    if override_tb_s:
        return float(override_tb_s) * 1e12
    for key, value in BANDWIDTH_BY_NAME:
        if key.lower() in name.lower():
            return value
    return None


def on_gpu() -> bool:
    import jax  # pylint: disable=import-outside-toplevel
    return jax.devices()[0].platform == "gpu"


def machine() -> Dict[str, str]:
    """What was measured on (without common.machine's imports of torch/TF: seconds each)."""
    import jax  # pylint: disable=import-outside-toplevel
    dev = jax.devices()[0]
    return {"card": card_name(), "jax": jax.__version__, "cores": str(os.cpu_count()),
            "jax_device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
            "cpu": common.cpu_model()}


def not_measured(name: str, title: str, headers, rows, why: str) -> Dict:
    return {"name": name, "title": title, "headers": headers, "rows": rows, "notes": [why],
            "data": {"measured": False}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (seconds, any device): checks the script runs")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--bandwidth_tb_s", type=float, default=None,
                        help="memory bandwidth of the card in TB/s (default: the table)")
    return parser.parse_args(argv)


def write_partial(args: argparse.Namespace, result: Dict):
    """Writes the rows measured so far to --json (marked partial), so a part stopped by
    bench/gpu.sh's time limit still leaves them."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, partial=True, smoke=bool(args.smoke)), f, indent=1,
                      default=str)


def main(run: Callable[[argparse.Namespace], Dict]):
    """Runs `run(args)`, prints its markdown table, writes --json."""
    args = parse_args()
    t0 = time.time()
    result = run(args)
    result["seconds"] = time.time() - t0
    result["smoke"] = bool(args.smoke)
    result["partial"] = False
    result.setdefault("machine", machine())
    print(common.render(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
