"""The shipped ONNX models behind KServe's Python model server, over Open Inference Protocol (V2) REST.

A stand-in for Triton in the tests (Triton cannot be installed here): the same protocol, a real server
process. It runs in its own virtual environment (kserve's pins clash with the service's), so it imports
only kserve, onnxruntime and numpy, never the service. Metadata comes from the ONNX graphs themselves, not
from the manifests, so the service's start-up check compares the manifests with what really runs.

    python tests/kserve_onnx_server.py --models-dir models --http-port 8080 [--delay-s 1.5]
        [--serve-as detector=quality]   # serve quality's graph under the detector's name: a wrong deployment
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse

DATATYPES = {"tensor(float)": "FP32"}


def _shape(dims: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in dims]  # symbolic dims ("batch") are variable


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: Path, delay_s: float) -> None:
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.delay_s = delay_s
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [
            {"name": i.name, "datatype": DATATYPES[i.type], "shape": _shape(i.shape)}
            for i in self.session.get_inputs()
        ]

    def get_output_types(self) -> list[dict]:
        return [
            {"name": o.name, "datatype": DATATYPES[o.type], "shape": _shape(o.shape)}
            for o in self.session.get_outputs()
        ]

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a slow or overloaded engine
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        wanted = [o.name for o in payload.request_outputs] or [o.name for o in self.session.get_outputs()]
        results = self.session.run(wanted, feeds)
        binary = bool(payload.parameters and payload.parameters.get("binary_data_output"))
        outputs = []
        for name, array in zip(wanted, results, strict=True):
            array = np.ascontiguousarray(array, dtype=np.float32)
            output = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            output.set_data_from_numpy(array, binary_data=binary)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=binary,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--serve-as", action="append", default=[], help="NAME=OTHER: OTHER's graph as NAME")
    args = parser.parse_args()
    swaps = dict(item.split("=", 1) for item in args.serve_as)
    names = ("detector", "quality", "segmenter", "severity")
    models = [
        OnnxModel(name, args.models_dir / swaps.get(name, name) / "model.onnx", args.delay_s)
        for name in names
    ]
    kserve.ModelServer(http_port=args.http_port, enable_grpc=False, workers=1).start(models)


if __name__ == "__main__":
    main()
