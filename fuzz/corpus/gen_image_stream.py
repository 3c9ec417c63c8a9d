#!/usr/bin/env python3
"""Writes fuzz/corpus/image_stream/: seeds of the image stream (FERRYIMG2, see
node-agent/src/criu/images.rs). `ok-*` must be accepted, `bad-*` refused. Run from anywhere."""
import json, os, struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "image_stream")
MAGIC = b"FERRYIMG2\n"

def header(h=None, raw=None):
    j = raw if raw is not None else json.dumps(h, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(j)) + j

H = {"migration": "m1", "container": "10.244.1.10", "from": "a1", "lock": "hold",
     "argv": ["/bin/srv", "--port", "7000"], "fail_restore": False}

def name(n):
    return struct.pack(">H", len(n)) + n

def data(n, off, b, length=None):
    n = n.encode() if isinstance(n, str) else n
    return b"\x01" + name(n) + struct.pack(">QI", off, len(b) if length is None else length) + b

def close(n, size):
    n = n.encode() if isinstance(n, str) else n
    return b"\x02" + name(n) + struct.pack(">Q", size)

END = b"\x00"

def whole(n, b):
    return (data(n, 0, b) if b else b"") + close(n, len(b))

seeds = {
    "ok-no-files": header(H) + END,
    "ok-two-files": header(H) + whole("core-1.img", b"core") + whole("pages-1.img", bytes(range(256)) * 8) + END,
    "ok-empty-file": header(H) + whole("empty.img", b"") + END,
    "ok-fail-restore": header(dict(H, migration="m2", container="10.244.1.11", argv=["/x"], fail_restore=True)) + whole("a.img", b"a") + END,
    "ok-interleaved": header(H) + data("pages-1.img", 0, b"aaaa") + data("pages-2.img", 0, b"xx")
        + data("pages-1.img", 4, b"bb") + close("pages-2.img", 2) + close("pages-1.img", 6) + whole("core-1.img", b"c") + END,
    "bad-empty": b"",
    "bad-magic": b"FERRYIMG1\n" + header(H)[len(MAGIC):] + END,
    "bad-header-len-zero": MAGIC + struct.pack(">I", 0),
    "bad-header-len-4g": MAGIC + struct.pack(">I", 0xFFFFFFFF) + b"{}",
    "bad-header-not-json": header(raw=b"not json at all") + END,
    "bad-header-unknown-field": header(dict(H, x=1)) + END,
    "bad-header-bad-ip": header(dict(H, container="10.244.1.300")) + END,
    "bad-name-256": header(H) + whole("a" * 256, b"1") + END,
    "bad-name-dotdot": header(H) + whole("..", b"1") + END,
    "bad-name-len-65535": header(H) + b"\x01" + struct.pack(">H", 65535) + b"a" * 100,
    "bad-name-not-utf8": header(H) + whole(b"\xff\xfe.img", b"1") + END,
    "bad-name-slash": header(H) + whole("a/b.img", b"1") + END,
    "bad-name-traversal": header(H) + whole("../../etc/passwd", b"1") + END,
    "bad-name-empty": header(H) + b"\x01" + struct.pack(">H", 0) + END,
    # A frame that would take the file past the test's 1 MiB limit: refused from its head.
    "bad-too-large": header(H) + data("pages-1.img", 0, b"\0") + data("pages-1.img", 1, b"\0" * 16, length=1 << 20),
    "bad-trailing": header(H) + whole("a.img", b"a") + END + b"\0",
    "bad-truncated-in-file": header(H) + data("a.img", 0, b"abc", length=10),
    "bad-truncated-no-end": header(H) + whole("a.img", b"abc"),
    "bad-truncated-unclosed": header(H) + data("a.img", 0, b"abc"),
    "bad-duplicate-name": header(H) + whole("a.img", b"1") + whole("a.img", b"2") + END,
    "bad-frame-kind": header(H) + b"\x07" + END,
    "bad-offset-gap": header(H) + data("a.img", 0, b"12") + data("a.img", 3, b"4") + close("a.img", 4) + END,
    "bad-offset-u64max": header(H) + data("a.img", 0xFFFFFFFFFFFFFFFF, b"1") + END,
    "bad-frame-len-zero": header(H) + data("a.img", 0, b"") + close("a.img", 0) + END,
    "bad-frame-len-4g": header(H) + data("a.img", 0, b"1", length=0xFFFFFFFF),
    "bad-close-size": header(H) + data("a.img", 0, b"1") + close("a.img", 2) + END,
    "bad-close-size-u64max": header(H) + close("a.img", 0xFFFFFFFFFFFFFFFF) + END,
    "bad-unclosed": header(H) + data("a.img", 0, b"1") + END,
    "bad-data-after-close": header(H) + whole("a.img", b"1") + data("a.img", 1, b"2") + close("a.img", 2) + END,
}

for f in os.listdir(OUT):
    if f.endswith(".bin"):
        os.remove(os.path.join(OUT, f))
for n, b in seeds.items():
    with open(os.path.join(OUT, n + ".bin"), "wb") as f:
        f.write(b)
print(f"{len(seeds)} seeds in {OUT}")
