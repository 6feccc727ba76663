"""Write the JSON Schema of every message and the AsyncAPI document.

They are generated from the protocol's classes, one <TYPE>.schema.json per message plus
asyncapi.json. With --check nothing is written: the command names the files that differ
from what would be generated and exits 1, so CI catches a schema that was not regenerated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kaldrix.protocol._asyncapi import generate_asyncapi
from kaldrix.protocol._jsonschema import generate_schemas

ASYNCAPI_FILE = "asyncapi.json"
_GENERATED = ("*.schema.json", ASYNCAPI_FILE)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("spec/schema"),
                        help="directory to write into (default: spec/schema)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming the files that differ")


def dump(document: Any) -> str:
    """The one text form of a generated document: stable, so diffs show real changes."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """Every generated file, by name, as text."""
    files = {name: dump(schema) for name, schema in generate_schemas().items()}
    files[ASYNCAPI_FILE] = dump(generate_asyncapi())
    return files


def differences(out: Path, files: dict[str, str]) -> list[str]:
    """Names of files in `out` that are missing, different, or no longer generated."""
    existing = {path.name for pattern in _GENERATED for path in out.glob(pattern)}
    changed = [
        name for name, text in files.items()
        if not (out / name).is_file() or (out / name).read_text(encoding="utf-8") != text
    ]
    return sorted(set(changed) | (existing - set(files)))


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    files = render()
    stale = differences(out, files) if out.is_dir() else sorted(files)
    if args.check:
        if stale:
            print(f"{out}: out of date ({len(stale)} files): {', '.join(stale)}", file=sys.stderr)
            print("run `python -m kaldrix schema` and commit the result", file=sys.stderr)
            return 1
        print(f"{out}: up to date ({len(files)} files)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        path = out / name
        if name in files:
            path.write_text(files[name], encoding="utf-8")
        else:
            path.unlink()
    print(f"{out}: {len(stale)} of {len(files)} files written or removed")
    return 0
