"""Drop a wheel's native libraries for other CUDA/ROCm/XPU versions, so it travels with a device call.

The bitsandbytes wheel (43 MB) carries one library per CUDA, ROCm and XPU version; the device machines run torch
+cu130, which loads ``libbitsandbytes_cuda130.so`` only. The slimmed wheel keeps every Python file and the libraries
named by ``--keep`` (default: cuda130 and the CPU one) and lists only what it holds in its RECORD.

    python bench/slim_wheel.py .whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
"""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path


def slim(path: Path, keep: list[str]) -> tuple[int, int]:
    """Rewrite the wheel at ``path`` in place; returns (bytes before, bytes after)."""
    before = path.stat().st_size
    tmp = path.with_suffix(".slim")
    dropped = set()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            name = info.filename
            if re.search(r"\.(so|dll|dylib)$", name) and not any(k in name for k in keep):
                dropped.add(name)
                continue
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if line.split(",")[0] not in dropped]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(path)
    return before, path.stat().st_size


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--keep", default="cuda130,_cpu", help="comma-separated parts of library names to keep")
    args = parser.parse_args(argv)
    before, after = slim(args.wheel, [k for k in args.keep.split(",") if k])
    print(f"{args.wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
