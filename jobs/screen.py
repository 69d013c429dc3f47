"""``ray job submit`` entrypoint of a screening.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/screen.py configs/demo.yaml

Takes the arguments of ``lensray screen``. Inside a Ray job ``RAY_ADDRESS`` is set, so the
screening connects to the job's cluster (``address="auto"``) instead of starting a local Ray.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    """Run ``lensray screen`` with ``argv``, on the cluster when RAY_ADDRESS is set."""
    from lensray.cli.main import main as lensray_main

    args = ["screen", *argv]
    if os.environ.get("RAY_ADDRESS") and "--address" not in args:
        args += ["--address", "auto"]
    return lensray_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
