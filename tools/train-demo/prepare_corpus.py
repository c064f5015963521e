#!/usr/bin/env python3
"""Prepares the demo model's corpus: Jane Austen's six novels from Debian's r-cran-janeaustenr
(text public domain, package MIT), read straight from the package's R lazy-load database, no R
needed. Writes <out>/train.txt and <out>/heldout.txt (the last chapters of Persuasion).

    python3 tools/train-demo/prepare_corpus.py --out .dev/train
"""
import argparse
import glob
import gzip
import lzma
import bz2
import os
import struct
import subprocess
import tempfile
import zlib

BOOK_ORDER = ["Sense and Sensibility", "Pride and Prejudice", "Mansfield Park", "Emma",
              "Northanger Abbey", "Persuasion"]


def blob(b):
    """One lazy-load record: 4-byte big-endian length, a compression tag, the stream."""
    tag = b[4:5]
    if tag == b"X":
        return lzma.decompress(b[5:])
    if tag == b"2":
        return bz2.decompress(b[5:])
    if tag == b"Z":
        return zlib.decompress(b[5:])
    return zlib.decompress(b[4:])


class RReader:
    """Just enough of R's XDR serialization for character vectors and lists."""

    def __init__(self, b):
        self.b, self.p, self.refs = b, 0, []

    def int(self):
        v = struct.unpack(">i", self.b[self.p:self.p + 4])[0]
        self.p += 4
        return v

    def obj(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 249, 248, 247, 243, 242):
            return None
        if t == 255:
            return self.refs[(flags >> 8) - 1]
        if t == 1:  # symbol
            v = self.obj()
            self.refs.append(v)
            return v
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            v = self.b[self.p:self.p + n].decode("utf-8", "replace")
            self.p += n
            return v
        if t in (2, 6, 17, 23):  # pairlists
            attr = self.obj() if has_attr else None
            tag = self.obj() if has_tag else None
            car, cdr = self.obj(), self.obj()
            return ("pair", tag, car, cdr, attr)
        if t in (16, 19, 20):
            v = [self.obj() for _ in range(self.int())]
        elif t in (13, 10):
            n = self.int()
            v = list(struct.unpack(">%di" % n, self.b[self.p:self.p + 4 * n]))
            self.p += 4 * n
        elif t == 14:
            n = self.int()
            v = list(struct.unpack(">%dd" % n, self.b[self.p:self.p + 8 * n]))
            self.p += 8 * n
        else:
            raise ValueError(f"unsupported R type {t} at byte {self.p}")
        if has_attr:
            self.obj()
        return v

    def top(self):
        assert self.b[:2] == b"X\n", "not an XDR R serialization"
        self.p = 2
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()
            self.p += n
        return self.obj()


def paragraphs(lines):
    out, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--heldout-chars", type=int, default=110_000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deb = glob.glob(os.path.join(tmp, "*.deb"))[0]
    subprocess.run(["dpkg", "-x", deb, os.path.join(tmp, "x")], check=True)
    base = glob.glob(os.path.join(tmp, "x/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"))[0][:-4]
    rdb = open(base + ".rdb", "rb").read()
    index = RReader(gzip.decompress(open(base + ".rdx", "rb").read())).top()
    books = {}
    for off, length in index[0]:
        lines = RReader(blob(rdb[off:off + length])).top()
        title = next(l for l in lines if l).strip().lower()
        books[title] = paragraphs(lines)
    os.makedirs(args.out, exist_ok=True)
    texts = {t: "\n\n".join(books[t.lower()]) for t in BOOK_ORDER}
    persuasion = texts["Persuasion"]
    cut = persuasion.rfind("\n\n", 0, len(persuasion) - args.heldout_chars)
    heldout = persuasion[cut + 2:]
    texts["Persuasion"] = persuasion[:cut]
    with open(os.path.join(args.out, "train.txt"), "w") as f:
        f.write("\n<|endoftext|>\n".join(texts[t] for t in BOOK_ORDER))
    with open(os.path.join(args.out, "heldout.txt"), "w") as f:
        f.write(heldout + "\n")
    print(f"train {sum(len(t) for t in texts.values())} chars, heldout {len(heldout)} chars")


if __name__ == "__main__":
    main()
