"""Wall time of `multvae ... --help` as a user runs it: a fresh interpreter each time.

    python bench/cli_startup.py            # 7 runs per command, median and max

Compares with importing torch alone (what every `--help` used to pay for, with scipy,
pandas and the training code on top).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "multvae --help": ["-m", "multvae_cli", "--help"],
    "multvae train --help": ["-m", "multvae_cli", "train", "--help"],
    "multvae data download --help": ["-m", "multvae_cli", "data", "download", "--help"],
    "import torch (for scale)": ["-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print("| command | median s | max s |")
    print("|---|---:|---:|")
    for name, argv in COMMANDS.items():
        times = []
        for _ in range(args.runs):
            tic = time.perf_counter()
            subprocess.run([sys.executable, *argv], check=True, capture_output=True)
            times.append(time.perf_counter() - tic)
        print(f"| `{name}` | {statistics.median(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()
