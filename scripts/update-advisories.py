#!/usr/bin/env python3
"""Rebuilds tests/data/rustsec.json from a checkout of the RustSec advisory
database (https://github.com/rustsec/advisory-db), for the offline
advisories check in tests/api/licences.rs.

    git clone https://github.com/rustsec/advisory-db /tmp/advisory-db
    scripts/update-advisories.py /tmp/advisory-db

Only what the check needs is kept: each crate advisory's id, package,
kind, withdrawal, affected OSes and the patched/unaffected version ranges.
"""
import json
import pathlib
import subprocess
import sys
import tomllib


def front_matter(text: str) -> str:
    # Advisories are Markdown that opens with a ```toml block.
    start = text.index("```toml") + len("```toml")
    return text[start : text.index("```", start)]


def main(db: str) -> None:
    root = pathlib.Path(db)
    commit = subprocess.run(
        ["git", "-C", db, "log", "-1", "--format=%H %cs"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    advisories = []
    for path in sorted((root / "crates").glob("*/*.md")):
        doc = tomllib.loads(front_matter(path.read_text()))
        advisory, versions = doc["advisory"], doc.get("versions", {})
        advisories.append({
            "id": advisory["id"],
            "package": advisory["package"],
            "informational": advisory.get("informational"),
            "withdrawn": advisory.get("withdrawn"),
            "os": doc.get("affected", {}).get("os", []),
            "patched": versions.get("patched", []),
            "unaffected": versions.get("unaffected", []),
        })
    out = pathlib.Path(__file__).resolve().parent.parent / "tests/data/rustsec.json"
    # One advisory per line, so an update reads well as a diff.
    lines = ",\n".join(json.dumps(a, sort_keys=True) for a in advisories)
    source = json.dumps(f"rustsec/advisory-db {commit[0]} ({commit[1]})")
    out.write_text(f'{{"source": {source},\n"advisories": [\n{lines}\n]}}\n')
    print(f"{len(advisories)} advisories from {commit[1]} written to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
