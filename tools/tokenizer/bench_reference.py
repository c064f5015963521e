#!/usr/bin/env python3
"""Reference tokenizer speed on the same corpus as bench/tokenizer.cc (qilin_bench_tokenizer).

    python3 tools/tokenizer/bench_reference.py [--corpus FILE] [--data DIR] [--json]

Runs Hugging Face `tokenizers` (tokenizer.json) and `tiktoken` (qwen.tiktoken with Qwen v1's
pattern and specials) and prints MB/s: one encode call over the whole corpus (single-threaded)
and a batch over ~4 KB chunks (all cores), as the C++ bench does. Without --corpus it builds the
corpus with the same recipe: golden texts, src/**/*.h|*.cc sorted by path, the data README, each
+ "\\n", repeated to 4.5 MB. Check that the printed sha256 matches `qilin_bench_tokenizer
--corpus-out FILE; sha256sum FILE` when comparing figures.
"""
import argparse
import base64
import hashlib
import json
import os
import statistics
import time
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_corpus(data_dir):
    unit = []
    with open(os.path.join(data_dir, "qwen-golden.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                unit.append(json.loads(line)["text"] + "\n")
    files = []
    for base, _, names in os.walk(os.path.join(ROOT, "src")):
        for n in names:
            if n.endswith((".h", ".cc")):
                files.append(os.path.relpath(os.path.join(base, n), ROOT).replace(os.sep, "/"))
    for rel in sorted(files):
        with open(os.path.join(ROOT, rel), "rb") as f:
            unit.append(f.read().decode("utf-8") + "\n")
    with open(os.path.join(data_dir, "README.md"), "rb") as f:
        unit.append(f.read().decode("utf-8") + "\n")
    unit = "".join(unit).encode("utf-8")
    corpus = b""
    while len(corpus) < 4_500_000:
        corpus += unit
    return corpus.decode("utf-8")


def chunks_of(text, size=4096):
    b = text.encode("utf-8")
    out, pos = [], 0
    while pos < len(b):
        end = min(len(b), pos + size)
        nl = b.find(b"\n", end)
        end = len(b) if nl < 0 else nl + 1
        out.append(b[pos:end].decode("utf-8"))
        pos = end
    return out


def median_seconds(fn, runs=3):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus")
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "tokenizer"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.corpus:
        with open(args.corpus, "rb") as f:
            corpus = f.read().decode("utf-8")
    else:
        corpus = build_corpus(args.data)
    raw = corpus.encode("utf-8")
    mb = len(raw) / 1e6
    chunks = chunks_of(corpus)
    results = {"corpus_bytes": len(raw), "corpus_sha256": hashlib.sha256(raw).hexdigest(),
               "cpus": os.cpu_count()}

    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(os.path.join(args.data, "tokenizer.json"))
    hf.encode(corpus)
    results["hf_tokens"] = len(hf.encode(corpus).ids)
    results["hf_single_call_mb_s"] = mb / median_seconds(lambda: hf.encode(corpus))
    results["hf_batch_mb_s"] = mb / median_seconds(lambda: hf.encode_batch(chunks))

    import tiktoken
    ranks = {}
    with open(os.path.join(args.data, "qwen.tiktoken"), "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    enc = tiktoken.Encoding("qwen", pat_str=PAT, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})
    nfc = unicodedata.normalize("NFC", corpus)
    nfc_chunks = [unicodedata.normalize("NFC", c) for c in chunks]
    results["tiktoken_tokens"] = len(enc.encode(nfc, allowed_special="all"))
    results["tiktoken_single_call_mb_s"] = mb / median_seconds(
        lambda: enc.encode(unicodedata.normalize("NFC", corpus), allowed_special="all"))
    results["tiktoken_batch_mb_s"] = mb / median_seconds(
        lambda: enc.encode_batch(nfc_chunks, allowed_special="all"))

    if args.json:
        print(json.dumps(results))
        return
    print(f"corpus: {mb:.2f} MB sha256 {results['corpus_sha256'][:16]}..., {os.cpu_count()} CPUs")
    print(f"{'case':40s} {'MB/s':>8s}")
    for k in ("hf_single_call_mb_s", "hf_batch_mb_s", "tiktoken_single_call_mb_s",
              "tiktoken_batch_mb_s"):
        print(f"{k:40s} {results[k]:8.2f}")
    print(f"tokens: hf {results['hf_tokens']}, tiktoken {results['tiktoken_tokens']}")


if __name__ == "__main__":
    main()
