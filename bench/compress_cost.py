"""
What compressing a message costs, zlib against zlib-ng (issue 8, item 5): CPU
instructions per NDJSON line (counted by ``valgrind --tool=callgrind``, so that the
figures do not depend on what else the machine is doing) and stored bytes against
``gzip -6``'s ratio, with each line compressed in its own ``compress`` call (as the
encoder does for a busy key) and with lines gathered into one call per ``--batch``
lines.

Usage (valgrind from Debian; zlib-ng from PyPI, not a dependency of loghandler)::

    .venv/bin/pip install zlib-ng
    .venv/bin/python bench/compress_cost.py [--lines 20000] [--batch 16]

Each figure is one valgrind run of a child process that builds the lines, minus one
that builds them and compresses nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import zlib
from typing import Any

WORDS = (
    "user said hello world error warning login logout payment item cart checkout page"
    " view click"
).split()


def lines(count: int) -> list[bytes]:
    """``count`` canonical NDJSON lines of short, varied texts (as bench/post.lua sends)."""
    rng = random.Random(1)
    out = []
    for n in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        text += " é %d" % rng.randrange(10**6)
        out.append(
            (
                '{"text":%s,"content_id":%d,"client_id":%d,"timestamp":%d}\n'
                % (json.dumps(text, ensure_ascii=False), n + 1, 1 + n % 10, 1796215068000 + n * 37)
            ).encode()
        )
    return out


def child(module: str, count: int, batch: int, compress: bool) -> None:
    """Build the lines; compress them when asked; print the stored ratio."""
    data = lines(count)
    if not compress:
        return
    if module == "zlib-ng":
        from zlib_ng import zlib_ng as mod  # type: ignore[import-not-found]
    else:
        mod = zlib
    chunks = [b"".join(data[i : i + batch]) for i in range(0, len(data), batch)]
    compressor = mod.compressobj(6, mod.DEFLATED, 31)
    out = [compressor.compress(chunk) for chunk in chunks]
    out.append(compressor.flush())
    print(sum(map(len, out)) / sum(map(len, data)))


def instructions(module: str, count: int, batch: int, compress: bool) -> tuple[int, str]:
    """Instructions of one child run under callgrind, and what it printed."""
    run = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            module,
            str(count),
            str(batch),
            "1" if compress else "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"Collected : (\d+)", run.stderr)
    assert match is not None, run.stderr
    return int(match.group(1)), run.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default="bench/compress_cost.json")
    args = parser.parse_args()
    gzip_ratio = len(zlib.compress(b"".join(lines(args.lines)), 6)) / sum(map(len, lines(args.lines)))
    results: list[dict[str, Any]] = []
    for module in ("zlib", "zlib-ng"):
        base, _ = instructions(module, args.lines, 1, False)
        for batch in (1, args.batch):
            total, ratio = instructions(module, args.lines, batch, True)
            results.append(
                {
                    "module": module,
                    "lines_per_call": batch,
                    "instructions_per_line": round((total - base) / args.lines),
                    "stored_vs_gzip6": round(float(ratio) / gzip_ratio, 4),
                }
            )
    reference = results[0]["instructions_per_line"]
    print("module    lines/call  instructions/line  vs zlib 1/call  stored vs gzip -6")
    for r in results:
        print(
            "%-9s %10d %18d %14.2fx %17.4fx"
            % (
                r["module"],
                r["lines_per_call"],
                r["instructions_per_line"],
                reference / r["instructions_per_line"],
                r["stored_vs_gzip6"],
            )
        )
    with open(args.json, "w") as f:
        json.dump({"lines": args.lines, "results": results}, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")
    else:
        main()
