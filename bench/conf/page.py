#!/usr/bin/env python3
"""Prints the compression benchmark's page: 20 KiB of real HTML (pydoc's
page for the json module, cut at a line and closed), made at run time
from this Python's own standard library, so that nothing is copied into
the repository. Usage: page.py [BYTES]"""
import json
import pydoc
import sys

size = int(sys.argv[1]) if len(sys.argv) > 1 else 20 * 1024
tail = "\n</body></html>\n"
text = pydoc.html.page(pydoc.describe(json), pydoc.html.document(json, "json"))
out = ""
for line in text.splitlines(keepends=True):
    if len((out + line + tail).encode()) > size:
        break
    out += line
# Padded to the exact size (spaces, which compress as a comment's dashes
# would), so that every run serves the same length.
out += " " * (size - len((out + tail).encode())) + tail
sys.stdout.write(out)
