"""Generate the Python code for the Signer API from protos/.

    python protos/generate.py          # rewrite signer/v1/*_pb2*.py(i)
    python protos/generate.py --check  # exit 1 if the committed code is stale

The proto root handed to protoc is protos/keyward, so the file signer/v1/signer.proto
becomes the importable module signer.v1.signer_pb2 with no import rewriting: the
generated code is exactly what protoc wrote and is never edited by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos" / "keyward"
PACKAGES = ["signer/v1"]
HEADER = '"""Generated from protos/ by `python protos/generate.py`: do not edit."""\n'


def generate(out: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    for package in PACKAGES:
        protos = sorted((PROTO_ROOT / package).glob("*.proto"))
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {package}")
        init = out / package / "__init__.py"
        init.write_text(HEADER)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check for staleness")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        stale = []
        for package in PACKAGES:
            fresh = sorted(p.name for p in (out / package).iterdir())
            have = (
                sorted(
                    p.name for p in (ROOT / package).iterdir() if p.is_file() and p.suffix != ".pyc"
                )
                if (ROOT / package).exists()
                else []
            )
            if fresh != have:
                stale.append(f"{package}: files {have} != {fresh}")
            for name in fresh:
                ours = ROOT / package / name
                if not ours.exists() or not filecmp.cmp(ours, out / package / name, shallow=False):
                    stale.append(f"{package}/{name}")
            if not args.check:
                target = ROOT / package
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(out / package, target)
        if args.check:
            if stale:
                print(
                    "generated code is stale; run `python protos/generate.py`:", *stale, sep="\n  "
                )
                return 1
            print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
