"""Pack, verify and open a 2 GB model folder; throughput and peak RSS, against `sha256sum` over the same files.

    .venv/bin/python benchmarks/package_throughput.py [--gib 2] [--files 4]

Everything runs in one call on one machine, with the files already in the page cache (sha256sum reads them
once first), each operation in its own process so its peak RSS is its own. `open` decrypts into /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, re, sys, time
from pathlib import Path
from workflow.package import archive
from workflow.package.kms import LocalKeyFile
op, source, package, keys, into = sys.argv[1:6]
kms, signer = LocalKeyFile(keys + "/kek.bin"), archive.load_signing_key(keys + "/signing.pem")
start = time.perf_counter()
if op == "pack":
    archive.pack(source, package, kms, signer, {})
elif op == "verify":
    archive.verify(package, signer.public_key(), kms)
else:
    archive.open_package(package, signer.public_key(), kms, into=into)
# VmHWM is this process's own high-water mark (ru_maxrss would include the parent's memory at fork)
peak = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak}))
"""


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ft2prod-pkg-bench-", dir="/var/tmp"))
    shm = Path("/dev/shm") / work.name
    try:
        source = work / "model"
        source.mkdir()
        each = int(args.gib * 2**30 / args.files)
        for i in range(args.files):
            with open(source / f"model-{i:05d}.safetensors", "wb") as handle:
                for _ in range(each // (64 << 20)):
                    handle.write(os.urandom(64 << 20))
        files = sorted(str(p) for p in source.iterdir())
        total = sum(Path(f).stat().st_size for f in files) / 1e9
        timed(["sha256sum", *files])  # warm the page cache
        sha = min(timed(["sha256sum", *files]) for _ in range(2))
        print(f"{total:.2f} GB in {args.files} files, {os.cpu_count()} cores")
        print(f"{'sha256sum':10} {total / sha:6.2f} GB/s")
        results = {}
        for op in ("pack", "verify", "open"):
            done = subprocess.run([sys.executable, "-c", CHILD, op, str(source), str(work / "pkg"), str(work / "keys"), str(shm)],
                                  check=True, capture_output=True, text=True)
            results[op] = json.loads(done.stdout.strip().splitlines()[-1])
            rate = total / results[op]["seconds"]
            print(f"{op:10} {rate:6.2f} GB/s  peak RSS {results[op]['peak_rss_mb']:7.1f} MB  ({rate / (total / sha):.2f}x sha256sum)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    main()
