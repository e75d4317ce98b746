"""``text_classifier`` with a GRU and a plain vocabulary file: padded variable-length batches.

The GRU packs its padded batch with the lengths the handler passes, so a text's answer
must not depend on the other texts of its batch (probabilities within 1e-5 on the CPU,
1e-4 where the server runs it on a GPU: cuDNN's kernels differ by batch size).
"""

from __future__ import annotations

import json
import textwrap

import httpx
import numpy as np

from server.core.archive import write_archive
from tests.builtin_models import concurrent_posts, mean_batch_size

GRU_NET = '''
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 8, padding_idx=0)
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, lengths):
        packed = pack_padded_sequence(self.embed(input_ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        return self.head(h[-1])
'''

VOCAB = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "."]


def test_gru_with_plain_vocabulary_pads_batches_without_changing_answers(osprey, store):
    import torch

    work = store.parent / "gru-build"
    work.mkdir()
    (work / "gru_net.py").write_text(textwrap.dedent(GRU_NET))
    namespace: dict = {}
    exec(compile(textwrap.dedent(GRU_NET), "gru_net", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["GRUClassifier"]()
    torch.save(model.state_dict(), work / "gru.pt")
    (work / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (work / "index_to_name.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    (work / "model-config.yaml").write_text("batchSize: 16\nmaxBatchDelay: 20\nhandler:\n  model_inputs: [input_ids, lengths]\n")
    write_archive(model_name="gru", handler="text_classifier", serialized_file=str(work / "gru.pt"),
                  model_file=str(work / "gru_net.py"), extra_files=[str(work / "vocab.txt"), str(work / "index_to_name.json")],
                  config_file=str(work / "model-config.yaml"), export_path=str(store))
    srv = osprey(models=["gru=gru.mar"], store=store)
    url = f"{srv.inference}/predictions/gru"

    texts = ["the cat", "The dog ran far, far away.", "cat", "the cat sat on the mat . the dog ran away",
             "zebra", "mat mat mat", "dog", "the cat sat"] * 4
    singles = [httpx.post(url, json={"text": t}, timeout=30).json() for t in texts]
    batched = [r.json() for r in concurrent_posts(url, [{"text": t} for t in texts], workers=32)]
    assert mean_batch_size(srv.metrics, "gru") > 1.0
    tol = 1e-4 if torch.cuda.is_available() else 1e-5
    for one, many in zip(singles, batched):
        assert set(one) == {"a", "b", "c"}
        for label in one:
            assert abs(one[label] - many[label]) <= tol

    # the answer is the model's own on the tokenized text (lowercased words, unknown -> [UNK])
    ids = [VOCAB.index(w) if w in VOCAB else 1 for w in "the dog ran far , far away .".split()]
    with torch.inference_mode():
        want = torch.softmax(model(torch.tensor([ids]), torch.tensor([len(ids)])), -1)[0].numpy()
    got = singles[1]
    np.testing.assert_allclose([got[k] for k in ("a", "b", "c")], want, atol=tol)
    # a list of texts is one request answered with a list, in order
    listed = httpx.post(url, json=texts[:3], timeout=30).json()
    for a, b in zip(listed, singles[:3]):
        for label in a:
            assert abs(a[label] - b[label]) <= tol
