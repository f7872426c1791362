"""Tests of the LM training library, its config and held-out perplexity."""
import importlib.util
import json
import os
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowbit_jax import train_lm
from lowbit_jax.data import stdlib_corpus
from lowbit_jax.eval import perplexity
from lowbit_jax.models.llama import Llama, LlamaConfig

_CONFIG_FILE = pathlib.Path(__file__).parents[1] / "configs" / "train_lm.py"


def _get_config(arg):
  spec = importlib.util.spec_from_file_location("train_lm_config", _CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def data():
  """A quick slice of the corpus: 120 training files, the whole held-out split."""
  train_docs = stdlib_corpus.load_corpus("train")[::5][:120]
  tok = stdlib_corpus.train_tokenizer((d.text for d in train_docs),
                                      LlamaConfig.smoke().vocab)
  return train_lm.LMData(
      tokenizer=tok,
      train_tokens=stdlib_corpus.encode_documents(train_docs, tok),
      heldout_tokens=stdlib_corpus.encode_documents(
          stdlib_corpus.load_corpus("heldout"), tok),
      token_bytes=stdlib_corpus.token_byte_lengths(tok))


def _smoke_config(**changes):
  config = _get_config("smoke")
  config.eval_every = 0
  config.log_every = 1
  config.eval_tokens = 2048
  for k, v in changes.items():
    setattr(config, k, v)
  return config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_config_variants_build_valid_models():
  for variant in ("smoke", "small", "base"):
    config = _get_config(variant)
    cfg = train_lm.model_config(config)
    assert cfg == getattr(LlamaConfig, variant)()
    assert config.seq_len <= cfg.max_len
  config = _get_config("small")
  config.model.n_experts = 4
  assert train_lm.model_config(config).n_experts == 4
  with pytest.raises(ValueError, match="unknown variant"):
    _get_config("huge")


def test_loss_decreases_on_the_corpus(data):
  cfg = LlamaConfig.smoke()
  model = Llama(cfg)
  steps = 30
  tx = train_lm.make_optimizer(1e-2, 5, steps)
  mesh = train_lm.make_mesh(1)
  state = train_lm.replicate(train_lm.init_state(model, tx, jax.random.key(0)), mesh)
  step_fn = train_lm.make_train_step(model, tx, mesh)
  losses = []
  for step in range(steps):
    batch = stdlib_corpus.batch_at(data.train_tokens, step, 8, 64, seed=0)
    state, metrics = step_fn(state, train_lm.shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == steps
  assert abs(losses[0] - math.log(cfg.vocab)) < 1.0
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses


@pytest.mark.parametrize("n_experts", [0, 4])
def test_data_parallel_on_8_devices_matches_1_device(data, n_experts):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  cfg = LlamaConfig.smoke(n_experts=n_experts)
  model = Llama(cfg)
  tx = train_lm.make_optimizer(1e-2, 2, 10)
  results = {}
  for n in (1, 8):
    mesh = train_lm.make_mesh(n)
    state = train_lm.replicate(
        train_lm.init_state(model, tx, jax.random.key(0)), mesh)
    step_fn = train_lm.make_train_step(model, tx, mesh, moe_aux_weight=0.01)
    losses = []
    for step in range(3):
      batch = train_lm.shard_batch(
          stdlib_corpus.batch_at(data.train_tokens, step, 8, 32, seed=1), mesh)
      if n == 8:
        assert len(batch.sharding.device_set) == 8
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics["loss"]))
    results[n] = (losses, state)
  np.testing.assert_allclose(results[8][0], results[1][0], rtol=1e-5)
  for a, b in zip(_leaves(results[8][1].params), _leaves(results[1][1].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    train_lm.shard_batch(np.zeros((4, 33), np.int32), train_lm.make_mesh(8))


def test_checkpoint_round_trip_is_bit_exact(tmp_path, data):
  cfg = LlamaConfig.smoke()
  model = Llama(cfg)
  tx = train_lm.make_optimizer(1e-2, 2, 10)
  mesh = train_lm.make_mesh(1)
  state = train_lm.replicate(train_lm.init_state(model, tx, jax.random.key(0)), mesh)
  step_fn = train_lm.make_train_step(model, tx, mesh)
  for step in range(2):
    batch = stdlib_corpus.batch_at(data.train_tokens, step, 8, 32, seed=0)
    state, _ = step_fn(state, train_lm.shard_batch(batch, mesh))
  manager = train_lm.checkpoint_manager(tmp_path / "ckpt")
  train_lm.save_checkpoint(manager, state)
  manager.wait_until_finished()
  abstract = train_lm.abstract_state(model, tx, mesh)
  restored = train_lm.restore_checkpoint(manager, abstract)
  manager.close()
  assert isinstance(restored, train_lm.TrainState) and int(restored.step) == 2
  assert (jax.tree.structure(restored) == jax.tree.structure(state))
  for a, b in zip(_leaves(restored), _leaves(state)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  empty = train_lm.checkpoint_manager(tmp_path / "none")
  assert train_lm.restore_checkpoint(empty, abstract) is None
  empty.close()


def test_killed_run_resumes_at_the_right_step_and_matches(tmp_path, data):
  config = _smoke_config(steps=12, ckpt_every=5, warmup_steps=2)
  full = train_lm.train(config, tmp_path / "full", data=data)
  assert full["step"] == 12 and full["final_eval"] is not None

  stopped = train_lm.train(config, tmp_path / "killed", data=data, stop_at=8)
  assert stopped["step"] == 8 and stopped["final_eval"] is None
  resumed = train_lm.train(config, tmp_path / "killed", data=data)
  assert resumed["step"] == 12

  log = [json.loads(line) for line in
         (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
  starts = [r for r in log if r["event"] == "start"]
  assert [s["resumed_from"] for s in starts] == [None, 5]
  train_steps = [r["step"] for r in log if r["event"] == "train"]
  assert train_steps == list(range(1, 9)) + list(range(6, 13))
  full_log = [json.loads(line) for line in
              (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
  full_loss = {r["step"]: r["loss"] for r in full_log if r["event"] == "train"}
  resumed_loss = {r["step"]: r["loss"] for r in log if r["event"] == "train"}
  assert resumed_loss == full_loss
  assert resumed["final_eval"] == full["final_eval"]
  final = json.loads((tmp_path / "killed" / "final_eval.json").read_text())
  assert final["step"] == 12 and final["bits_per_byte"] > 0


def test_resume_with_another_model_is_refused_and_keeps_the_run(tmp_path, data):
  # Checkpoints of one model must not be resumed under another config, and
  # the failed attempt must not overwrite the run's config.json (init_from
  # and the sweeps read it). Steps may change: that extends the run.
  config = _smoke_config(steps=2, ckpt_every=0, warmup_steps=1)
  train_lm.train(config, tmp_path / "run", data=data)
  before = (tmp_path / "run" / "config.json").read_text()
  other = _smoke_config(steps=2, ckpt_every=0, warmup_steps=1)
  other.model.d_ff = config.model.d_ff * 2
  with pytest.raises(ValueError, match=r"another config: model.d_ff=\d+ \(asked: "
                     r"\d+\).*use another --workdir"):
    train_lm.train(other, tmp_path / "run", data=data)
  assert (tmp_path / "run" / "config.json").read_text() == before
  longer = _smoke_config(steps=3, ckpt_every=0, warmup_steps=1)
  assert train_lm.train(longer, tmp_path / "run", data=data)["step"] == 3
  # Written atomically, with a plain open()'s mode (mkstemp's is 0600).
  umask = os.umask(0)
  os.umask(umask)
  for name in ("config.json", "final_eval.json"):
    assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o666 & ~umask
  # Another data stream is refused too (its config.json recorded only the
  # new one); so is a run already past the steps asked for, which trained
  # nothing, evaluated nothing and rewrote config.json.
  before = (tmp_path / "run" / "config.json").read_text()
  for field, value, match in (("batch_size", 16, r"batch_size=8 \(asked: 16\)"),
                              ("data_seed", 7, r"data_seed=0 \(asked: 7\)"),
                              ("steps", 2, r"at step 3, past config.steps=2")):
    changed = _smoke_config(steps=3, ckpt_every=0, warmup_steps=1)
    changed[field] = value
    with pytest.raises(ValueError, match=match):
      train_lm.train(changed, tmp_path / "run", data=data)
    assert (tmp_path / "run" / "config.json").read_text() == before
  # A changed schedule is taken and recorded in the log's start event.
  relr = _smoke_config(steps=4, ckpt_every=0, warmup_steps=1, lr=1e-3)
  assert train_lm.train(relr, tmp_path / "run", data=data)["step"] == 4
  starts = [json.loads(line) for line in
            (tmp_path / "run" / "log.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "start"]
  assert "steps=3 (asked: 4)" in starts[-1]["config_changes"]
  assert any(c.startswith("lr=") for c in starts[-1]["config_changes"])
  with pytest.raises(ValueError, match="keep_checkpoints must be an int >= 1"):
    train_lm.train(_smoke_config(steps=4, keep_checkpoints=0), tmp_path / "k0", data=data)
  longer = relr
  # A float run resumed with QAT on (its config has no quant fields to
  # compare): refused before anything is written (Orbax failed on the tree
  # structure after config.json had been overwritten).
  spec = importlib.util.spec_from_file_location(
      "train_qat_config", _CONFIG_FILE.parent / "train_qat.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  qat = module.get_config("smoke")
  qat.model = longer.model
  before = (tmp_path / "run" / "config.json").read_text()
  with pytest.raises(ValueError, match=r"quantization-aware training off \(asked: on\)"):
    train_lm.train(qat, tmp_path / "run", data=data)
  assert (tmp_path / "run" / "config.json").read_text() == before


def _bigram_apply(table, x):
  return table[x]


def test_perplexity_scores_every_token_once():
  rng = np.random.default_rng(0)
  vocab = 7
  table = jnp.asarray(rng.normal(size=(vocab, vocab)), jnp.float32)
  tokens = rng.integers(0, vocab, size=101)
  logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
  expected = -np.mean(logp[tokens[:-1], tokens[1:]])
  for seq_len, batch in [(10, 3), (100, 1), (7, 4), (200, 2)]:
    out = perplexity(_bigram_apply, table, tokens, seq_len, batch, num_bytes=50)
    assert out["num_tokens"] == 100
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(out["perplexity"], math.exp(expected), rtol=1e-5)
    np.testing.assert_allclose(out["bits_per_byte"],
                               expected * 100 / math.log(2) / 50, rtol=1e-5)
  uniform = perplexity(lambda p, x: jnp.zeros(x.shape + (vocab,)), None, tokens,
                       16, 2)
  np.testing.assert_allclose(uniform["perplexity"], vocab, rtol=1e-5)
  assert uniform["bits_per_byte"] is None
  with pytest.raises(ValueError, match="at least 2 tokens"):
    perplexity(_bigram_apply, table, tokens[:1], 4, 1)
  # Ids a model cannot look up are refused, not wrapped (-1 read as vocab - 1)
  # or turned into NaN (ids past the table).
  with pytest.raises(ValueError, match=r"ids must be in \[0, vocab\), got ids from -1"):
    perplexity(_bigram_apply, table, np.array([1, 2, -1, 3]), 4, 1)
  with pytest.raises(ValueError, match="token id 7 is outside the model's "
                     "vocabulary of 7"):
    perplexity(_bigram_apply, table, np.array([1, 2, 7, 3]), 4, 1)
  with pytest.raises(ValueError, match="integer ids"):
    perplexity(_bigram_apply, table, np.array([1.5, 2.0, 3.0]), 4, 1)
  # A hopeless model's perplexity overflows to inf, with its loss kept.
  hopeless = perplexity(lambda p, x: jax.nn.one_hot(x, vocab) * 5000.0, None,
                        tokens, 16, 2)   # sure the next token repeats this one
  assert hopeless["perplexity"] == math.inf and hopeless["loss"] > 709
  # NaN logits (a broken quantized model) were reported as perplexity inf.
  broken = perplexity(lambda p, x: jnp.full(x.shape + (vocab,), jnp.nan), None,
                      tokens, 16, 2, num_bytes=50)
  assert all(math.isnan(broken[k]) for k in ("loss", "perplexity", "bits_per_byte"))
  # Sizes that are not ints were refused deep in numpy, unnamed.
  for kw in (dict(seq_len=2.5, batch=1), dict(seq_len=2, batch=1.5),
             dict(seq_len=True, batch=1)):
    with pytest.raises(ValueError, match="must be an int >= 1"):
      perplexity(_bigram_apply, table, tokens, **kw)


def test_optimizer_schedule_and_bad_config(tmp_path):
  schedule = train_lm.make_schedule(1.0, 10, 110, min_lr_ratio=0.1)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1.0)
  np.testing.assert_allclose(float(schedule(110)), 0.1, rtol=1e-6)
  tx = train_lm.make_optimizer(1.0, 1, 2, weight_decay=0.5, clip_norm=0.0)
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt_state = tx.init(params)
  new = params
  for expected_w in (1.0, 0.5):  # lr is 0 at step 0, then 1: w -= lr * 0.5 * w
    updates, opt_state = tx.update(zeros, opt_state, new)
    new = optax.apply_updates(new, updates)
    np.testing.assert_allclose(np.asarray(new["w"]), expected_w)
    np.testing.assert_array_equal(np.asarray(new["scale"]), 1.0)  # never decayed
  with pytest.raises(ValueError, match="warmup_steps"):
    train_lm.make_schedule(1.0, 20, 10)
  all_warmup = train_lm.make_schedule(1.0, 10, 10)   # no decay phase left
  np.testing.assert_allclose([float(all_warmup(s)) for s in (0, 5, 10)],
                             [0.0, 0.5, 1.0])
  with pytest.raises(ValueError, match="config.log_every must be >= 1"):
    train_lm.train(_smoke_config(log_every=0), tmp_path / "run")
  with pytest.raises(ValueError, match="config.ckpt_every must be >= 0"):
    train_lm.train(_smoke_config(ckpt_every=-1), tmp_path / "run")
  spec = importlib.util.spec_from_file_location(
      "train_qat_config", _CONFIG_FILE.parent / "train_qat.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  qat = module.get_config("smoke")
  qat.quant.start_step = qat.steps
  with pytest.raises(ValueError, match="quant.start_step=.* is not below "
                     "config.steps.*never switch on"):
    train_lm.train(qat, tmp_path / "run")
  with pytest.raises(ValueError, match="seq_len"):
    train_lm.train(_smoke_config(seq_len=1000), tmp_path / "run")
  assert not (tmp_path / "run").exists()
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    train_lm.train(_smoke_config(batch_size=6, num_devices=4), tmp_path / "run")


def test_evaluate_refuses_a_negative_token_count(data):
  # tokens[:-5] silently dropped the last 5 tokens instead of keeping a prefix.
  with pytest.raises(ValueError, match="max_tokens must be an int >= 0"):
    train_lm.evaluate(lambda p, x: jnp.zeros(x.shape + (8,)), None, data,
                      seq_len=16, batch=2, max_tokens=-5)


def test_a_negative_data_seed_is_refused_before_any_work(tmp_path):
  # It reached numpy's generator after the tokenizer and model were built
  # (81 s), which said only "expected non-negative integer".
  with pytest.raises(ValueError, match="config.data_seed must be an int >= 0, got -1"):
    train_lm.train(_smoke_config(data_seed=-1), tmp_path / "r")
  assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
