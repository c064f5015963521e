#!/usr/bin/env python3
"""A KServe v2 gRPC client of qilin (or Triton + tensorrtllm_backend) with plain grpcio.

The project's protos (proto/*.proto) are compiled at run time with grpc_tools (Debian:
python3-grpcio, python3-grpc-tools); no tritonclient needed. Like the tutorial's
inflight_batcher_llm_client.py it sends text to the `ensemble` model, either with ModelInfer
or, with --streaming, on a ModelStreamInfer stream, printing each decoupled response as it
arrives until the one marked triton_final_response.

    python3 examples/python/kserve_grpc_client.py --url localhost:8001 --text "Hello" --streaming
"""
import argparse
import importlib
import os
import struct
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))


def load_protos(proto_dir):
    """Compiles grpc_service.proto and model_config.proto into a temporary package."""
    out = tempfile.mkdtemp(prefix="qilin_protos_")
    protos = [os.path.join(proto_dir, p) for p in ("model_config.proto", "grpc_service.proto")]
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}"] + protos)
    if rc != 0:
        sys.exit(f"protoc failed on {protos} (rc {rc})")
    sys.path.insert(0, out)
    return (importlib.import_module("grpc_service_pb2"),
            importlib.import_module("grpc_service_pb2_grpc"))


def bytes_tensor(pb, name, value):
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=[1, 1])
    t.contents.bytes_contents.append(value.encode("utf-8"))
    return t


def int_tensor(pb, name, value):
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype="INT32", shape=[1, 1])
    t.contents.int_contents.append(value)
    return t


def bool_tensor(pb, name, value):
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype="BOOL", shape=[1, 1])
    t.contents.bool_contents.append(value)
    return t


def text_output(response):
    """text_output of a response: raw contents (4-byte length + bytes) or typed contents."""
    for i, out in enumerate(response.outputs):
        if out.name != "text_output":
            continue
        if i < len(response.raw_output_contents):
            raw, texts, pos = response.raw_output_contents[i], [], 0
            while pos + 4 <= len(raw):
                (n,) = struct.unpack_from("<I", raw, pos)
                texts.append(raw[pos + 4:pos + 4 + n].decode("utf-8", errors="replace"))
                pos += 4 + n
            return "".join(texts)
        return b"".join(out.contents.bytes_contents).decode("utf-8", errors="replace")
    return ""


def is_final(response):
    p = response.parameters.get("triton_final_response")
    return p is not None and p.bool_param


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="localhost:8001", help="gRPC HOST:PORT")
    ap.add_argument("--model", default="ensemble")
    ap.add_argument("--text", default="It is a truth universally acknowledged")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--streaming", action="store_true", help="ModelStreamInfer, decoupled")
    ap.add_argument("--requests", type=int, default=1, help="streaming: requests in flight on the stream")
    ap.add_argument("--proto-dir", default=PROTO_DIR)
    args = ap.parse_args()

    pb, pb_grpc = load_protos(args.proto_dir)
    channel = grpc.insecure_channel(args.url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    if not stub.ServerLive(pb.ServerLiveRequest()).live:
        sys.exit("the server is not live")
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    print(f"server {meta.name} {meta.version}; model {args.model} ready:",
          stub.ModelReady(pb.ModelReadyRequest(name=args.model)).ready)

    def request(i):
        req = pb.ModelInferRequest(model_name=args.model, id=f"py-{i}")
        req.inputs.extend([bytes_tensor(pb, "text_input", args.text),
                           int_tensor(pb, "max_tokens", args.max_tokens)])
        if args.streaming:
            req.inputs.append(bool_tensor(pb, "stream", True))
        return req

    if not args.streaming:
        resp = stub.ModelInfer(request(0))
        print(f"[{resp.id}] {text_output(resp)}")
        print("final response")
        return

    # One stream, several requests in flight; responses are matched by id.
    t0 = time.time()
    texts, finals = {}, set()
    responses = stub.ModelStreamInfer(iter([request(i) for i in range(args.requests)]))
    for r in responses:
        if r.error_message:
            sys.exit(f"error: {r.error_message}")
        resp = r.infer_response
        delta = text_output(resp)
        texts[resp.id] = texts.get(resp.id, "") + delta
        print(f"[{resp.id} +{(time.time() - t0) * 1e3:.0f} ms] {delta!r}", flush=True)
        if is_final(resp):
            finals.add(resp.id)
            if len(finals) == args.requests:
                break
    responses.cancel()
    for rid, text in sorted(texts.items()):
        print(f"[{rid}] {text}")
    print(f"final response for {len(finals)} of {args.requests} requests")
    if len(finals) != args.requests:
        sys.exit(1)


if __name__ == "__main__":
    main()
