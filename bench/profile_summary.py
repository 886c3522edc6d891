"""Summarise a py-spy raw profile (``bench/run.py --profile`` writes them).

    .venv/bin/python bench/profile_summary.py bench/results/profile-intake.txt [--top 25]

Per thread: samples, the functions with the most *self* samples (the leaf frame), the
most *inclusive* samples (anywhere on the stack, once per sample), and a breakdown into
coarse buckets (HTTP server, Starlette, logging, SQLite, aiohttp, ...) by the innermost
bucket found on the stack. Percentages are of that thread's samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

# (bucket, pattern on "function (file:line)"), the innermost matching frame decides.
BUCKETS: list[tuple[str, str]] = [
    ("logging", r"\(logging/|observability\.py"),
    ("json (orjson/json)", r"orjson|\(json/"),
    ("sqlite (queue ops)", r"bridge/queue/sqlite\.py"),
    ("sqlite writer (commit/fsync)", r"bridge/queue/_writer\.py"),
    ("signature (hmac)", r"bridge/signature\.py|\(hmac\.py"),
    ("convert", r"bridge/convert/"),
    ("intake handler", r"bridge/intake\.py"),
    ("forwarder", r"bridge/forward\.py"),
    ("vela client", r"bridge/vela\.py"),
    ("aiohttp client", r"aiohttp/"),
    ("tenacity", r"tenacity/"),
    ("starlette", r"starlette/"),
    ("uvicorn h11 protocol", r"uvicorn/protocols/http/h11"),
    ("uvicorn httptools protocol", r"uvicorn/protocols/http/httptools"),
    ("uvicorn other", r"uvicorn/"),
    ("h11", r"\(h11/"),
    ("anyio", r"anyio/"),
    ("asyncio (event loop, transports)", r"asyncio/"),
]
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")


def parse(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    threads: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        frames = m["stack"].split(";")
        thread = re.sub(r"^thread \(\d+\): ", "", frames[0]).strip()
        threads[thread].append((frames[1:], int(m["count"])))
    return threads


def bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in BUCKETS:
            if re.search(pattern, frame):
                return name
    return "other"


def _func(frame: str) -> str:
    """Function and file, without the line number (lines split one function apart)."""
    return re.sub(r":\d+\)$", ")", frame)


def summarise(path: Path, top: int) -> None:
    threads = parse(path)
    total_all = sum(c for stacks in threads.values() for _, c in stacks)
    print(f"{path}: {total_all} samples")
    for thread, stacks in sorted(threads.items(), key=lambda t: -sum(c for _, c in t[1])):
        total = sum(c for _, c in stacks)
        if total < total_all * 0.02:
            continue
        selfs: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        buckets: Counter[str] = Counter()
        for frames, count in stacks:
            if frames:
                selfs[_func(frames[-1])] += count
            for func in {_func(f) for f in frames}:
                incl[func] += count
            buckets[bucket(frames)] += count
        print(f"\n== thread {thread}: {total} samples ({100 * total / total_all:.0f} %)")
        print("-- buckets (innermost match)")
        for name, count in buckets.most_common():
            print(f"  {100 * count / total:5.1f} %  {name}")
        print(f"-- top {top} self")
        for name, count in selfs.most_common(top):
            print(f"  {100 * count / total:5.1f} %  {name}")
        print(f"-- top {top} inclusive")
        for name, count in incl.most_common(top):
            print(f"  {100 * count / total:5.1f} %  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.profiles:
        summarise(path, args.top)
        print()


if __name__ == "__main__":
    main()
