#!/usr/bin/env python3
"""Checks around the seed's Go client (scripts/seed-go), for scripts/interop.sh.

  check.py verbatim --seed-doc PATH --source seed_client.go
      The "Go Client" block of the seed document must be the start of seed_client.go,
      byte for byte (trailing spaces included): the seed's code runs unchanged.
  check.py keys --dir DIR
      Every file in DIR is named by the key the server returned for its content; that
      key must be the BLAKE3 digest of the content (needs the blake3 package).

Exits non-zero, saying why, when a check fails.
"""

import argparse
import os
import sys

SECTION = "### Go Client"
FENCE_OPEN = "```go\n"
FENCE_CLOSE = "```"


def seed_block(doc_text):
    section = doc_text.index(SECTION)
    start = doc_text.index(FENCE_OPEN, section) + len(FENCE_OPEN)
    end = doc_text.index(FENCE_CLOSE, start)
    return doc_text[start:end]


def verbatim(args):
    with open(args.seed_doc, encoding="utf-8") as f:
        block = seed_block(f.read())
    with open(args.source, encoding="utf-8") as f:
        source = f.read()
    if not source.startswith(block):
        common = next(
            (i for i, (a, b) in enumerate(zip(block, source)) if a != b),
            min(len(block), len(source)),
        )
        line = block[:common].count("\n") + 1
        sys.exit(f"check.py: {args.source} no longer starts with the seed's Go client "
                 f"(first difference on line {line})")
    print(f"check.py: {args.source} starts with the seed's Go client, verbatim "
          f"({block.count(chr(10))} lines)")


def keys(args):
    import blake3

    names = sorted(os.listdir(args.dir))
    if not names:
        sys.exit(f"check.py: no blobs in {args.dir}")
    for name in names:
        with open(os.path.join(args.dir, name), "rb") as f:
            digest = blake3.blake3(f.read()).hexdigest()
        if digest != name:
            sys.exit(f"check.py: the server's key {name} is not the BLAKE3 digest "
                     f"of its content ({digest})")
    print(f"check.py: {len(names)} keys are the BLAKE3 digests of their contents")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    v = commands.add_parser("verbatim")
    v.add_argument("--seed-doc", required=True)
    v.add_argument("--source", required=True)
    k = commands.add_parser("keys")
    k.add_argument("--dir", required=True)
    args = parser.parse_args()
    {"verbatim": verbatim, "keys": keys}[args.command](args)


if __name__ == "__main__":
    main()
