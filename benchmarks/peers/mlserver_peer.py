"""MLServer 1.7 serving the benchmark's models: a custom runtime (run in the peer's own venv).

``benchmarks/systems.py`` writes MLServer's ``settings.json`` and one ``model-settings.json``
per model naming ``mlserver_peer.TorchModel`` as the implementation, the model's spec under
``parameters.extra``, and MLServer's adaptive batching set to the archive's batching
(``max_batch_size`` = batchSize, ``max_batch_time`` = maxBatchDelay; batchSize 1 leaves it off),
then runs ``mlserver start FOLDER``. Requests are the Open Inference Protocol's (REST JSON or
gRPC): mlp an FP32 Nx16 tensor, the CNN FP32 Nx3xSxS, digits one base64 PNG per row (BYTES).
MLServer's adaptive batcher concatenates requests along the first dimension and splits the
answer the same way, so ``predict`` sees a batch.
"""

from __future__ import annotations

import base64
import json

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from common import Model


class TorchModel(MLModel):
    async def load(self) -> bool:
        self.m = Model(self.name, self.settings.parameters.extra)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inp = payload.inputs[0]
        if self.m.kind == "digits":
            rows = [base64.b64decode(v) for v in inp.data.root]
            answers = self.m.run(rows)
            data = [json.dumps(a) for a in answers]
            out = ResponseOutput(name="OUTPUT0", datatype="BYTES", shape=[len(data)], data=data)
        else:
            x = NumpyCodec.decode_input(inp)
            if self.m.kind == "mlp":
                out = NumpyCodec.encode_output("OUTPUT0", np.asarray(self.m.run(x.tolist()), dtype=np.float32))
            else:
                rows = [row.astype(np.float32).tobytes() for row in x]
                classes = np.asarray([a["class"] for a in self.m.run(rows)], dtype=np.int64)
                out = NumpyCodec.encode_output("class", classes)
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=[out])
