"""Check the quickstart's promise: `aflora train recipes/quickstart.yaml` ends in under 5 minutes on
2 CPU cores with validation accuracy of at least 0.80. Run on a quiet machine:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quickstart.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import QUICKSTART, timed, train_command

MAX_SECONDS = 300.0
MIN_ACCURACY = 0.80


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="extra recipe overrides, as for aflora train")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seconds = timed(train_command(QUICKSTART, f"{tmp}/run", *args.set), stderr=None)
        manifest = json.loads((Path(tmp) / "run" / "last" / "adapter_config.json").read_text())
    accuracy = manifest["metrics"]["validation"]["accuracy"]
    average = manifest["trainable_params"]["average"]
    ok_time, ok_accuracy = seconds < MAX_SECONDS, accuracy >= MIN_ACCURACY
    print(f"wall time          {seconds:7.1f} s   (target < {MAX_SECONDS:.0f} s)   {'ok' if ok_time else 'MISSED'}")
    print(f"validation accuracy {accuracy:7.4f}   (target >= {MIN_ACCURACY})      {'ok' if ok_accuracy else 'MISSED'}")
    print(f"average trainable parameters (no head): {average:,.0f}")
    return 0 if ok_time and ok_accuracy else 1


if __name__ == "__main__":
    raise SystemExit(main())
