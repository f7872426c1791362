"""Checkpoints never lose the last good state, and damage is detected.

Fault injection (an exception or a SIGKILL at every step of ``save``), byte
flips in every file, concurrent saves, and metadata that contradicts the
stored arrays.
"""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import checkpoint


@functools.lru_cache(maxsize=None)
def _tree(seed):
  x = jax.random.normal(jax.random.key(seed), (32, 64))
  return {"w": lb.quantize(x, lb.QuantSpec("int4", axis=-1, group_size=32)),
          "m": lb.quantize(x, lb.QuantSpec("mxfp4", axis=-1)),
          "b": jnp.arange(8.0) + seed}


def _which(restored):
  """0 or 1: which of _tree(0), _tree(1) ``restored`` is (asserts it is one)."""
  b = np.asarray(restored["b"])
  seed = int(b[0])
  assert seed in (0, 1), b
  want = _tree(seed)
  for k in ("w", "m"):
    np.testing.assert_array_equal(np.asarray(restored[k].codes),
                                  np.asarray(want[k].codes))
    np.testing.assert_array_equal(np.asarray(restored[k].scale),
                                  np.asarray(want[k].scale))
  return seed


class _Boom(Exception):
  pass


_STEPS = [("checkpoint", "_write_arrays"), ("checkpoint", "_write_meta"),
          ("checkpoint", "_fsync_tree"), ("checkpoint", "_exchange"),
          ("os", "rename"), ("shutil", "rmtree"), ("checkpoint", "_fsync_dir")]


def _inject(monkeypatch, fail_at):
  """Makes the ``fail_at``-th call to any save step raise (after doing half)."""
  calls = [0]
  for mod_name, fn_name in _STEPS:
    mod = {"checkpoint": checkpoint, "os": checkpoint.os,
           "shutil": checkpoint.shutil}[mod_name]
    orig = getattr(mod, fn_name)

    def wrapped(*a, _orig=orig, _name=fn_name, **kw):
      calls[0] += 1
      if calls[0] == fail_at:
        if _name == "_write_meta":  # a truncated metadata file
          with open(a[0], "w") as f:
            f.write(json.dumps(a[1])[:50])
        raise _Boom(_name)
      return _orig(*a, **kw)
    monkeypatch.setattr(mod, fn_name, wrapped)
  return calls


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two_renames"])
def test_save_failing_at_any_step_keeps_old_or_new(tmp_path, monkeypatch, exchange):
  if not exchange:
    monkeypatch.setattr(checkpoint, "_RENAMEAT2", None)
  d, old = tmp_path / "ck", tmp_path / "old"
  checkpoint.save(old, _tree(0))
  shutil.copytree(old, d)
  new = _tree(1)
  seen, k = set(), 1
  while True:
    with monkeypatch.context() as m:
      calls = _inject(m, k)
      try:
        checkpoint.save(d, new, force=True)
        finished = True
      except _Boom:
        finished = False
    seen.add(_which(checkpoint.restore(d)))
    if finished:
      assert calls[0] < k  # every step has been failed once
      break
    if k % 3 == 0:  # the next save cleans up after the failed one and succeeds
      checkpoint.save(d, _tree(0), force=True)
      assert _which(checkpoint.restore(d)) == 0
    else:
      shutil.rmtree(d, ignore_errors=True)
      shutil.copytree(old, d)
    k += 1
  assert k >= 6 and seen == {0, 1}
  assert _which(checkpoint.restore(d)) == 1
  checkpoint.save(d, new, force=True)
  leftovers = sorted(os.listdir(tmp_path))
  assert leftovers == ["ck", "old"], leftovers


def test_crash_between_two_renames_restores_old_and_next_save_recovers(
    tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint, "_RENAMEAT2", None)
  d = tmp_path / "ck"
  checkpoint.save(d, _tree(0))
  orig = os.rename

  def rename(a, b):
    if ".ck.tmp-" in str(a) and str(b) == str(d):
      raise _Boom()  # the old one moved aside, the new one not yet in place
    orig(a, b)
  monkeypatch.setattr(checkpoint.os, "rename", rename)
  with pytest.raises(_Boom):
    checkpoint.save(d, _tree(1), force=True)
  monkeypatch.setattr(checkpoint.os, "rename", orig)
  assert not d.exists()
  assert _which(checkpoint.restore(d)) == 0
  with pytest.raises(FileExistsError):  # the old checkpoint is still there
    checkpoint.save(d, _tree(1))
  assert d.exists() and _which(checkpoint.restore(d)) == 0


_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from lowbit_jax import checkpoint
    trees = [checkpoint.restore({src!r} + str(i)) for i in (0, 1)]
    print("ready", flush=True)
    i = 1
    while True:
      checkpoint.save({d!r}, trees[i % 2], force=True)
      i += 1
""")


def _kill_during_saves(tmp_path, delays):
  d, src = str(tmp_path / "ck"), str(tmp_path / "src")
  checkpoint.save(d, _tree(0))
  checkpoint.save(src + "0", _tree(0))
  checkpoint.save(src + "1", _tree(1))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  seen = []
  for delay in delays:
    with subprocess.Popen(
        [sys.executable, "-c", _WORKER.format(root=root, d=d, src=src)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env) as p:
      assert p.stdout.readline().strip() == b"ready"
      time.sleep(delay)
      p.kill()
    seen.append(_which(checkpoint.restore(d)))
  checkpoint.save(d, _tree(0), force=True)  # a killed save never blocks the next
  assert sorted(os.listdir(tmp_path)) == ["ck", "src0", "src1"]
  return seen


@pytest.mark.slow
def test_killed_save_keeps_old_or_new(tmp_path):
  _kill_during_saves(tmp_path, [0.35])


@pytest.mark.slow
def test_killed_save_at_many_points_keeps_old_or_new(tmp_path):
  seen = _kill_during_saves(tmp_path, [0.03 * i for i in range(1, 11)])
  assert set(seen) == {0, 1}


def _flip(path, offset):
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[offset % len(data)] ^= 0xFF
  with open(path, "wb") as f:
    f.write(data)


def test_a_flipped_byte_in_any_file_is_detected(tmp_path):
  good = tmp_path / "good"
  checkpoint.save(good, _tree(0))
  files = sorted(os.path.relpath(os.path.join(r, f), good)
                 for r, _, fs in os.walk(good) for f in fs)
  assert len(files) >= 8 and "lowbit_jax.json" in files
  stored = {"w/codes", "w/scale", "m/codes", "m/scale", "b"}
  named = []
  for rel in files:
    for where in (0.1, 0.5):
      bad = tmp_path / "bad"
      shutil.rmtree(bad, ignore_errors=True)
      shutil.copytree(good, bad)
      _flip(bad / rel, int(os.path.getsize(bad / rel) * where))
      with pytest.raises(checkpoint.CheckpointCorruptedError) as e:
        checkpoint.restore(bad)
      msg = str(e.value)
      assert os.path.basename(rel) in msg, (rel, msg)
      assert len(msg.splitlines()) == 1, msg
      if rel.startswith("arrays"):  # the leaves the damage ruins are named
        leaves = set(re.findall(
            r"'([\w/]+)' \((?:unreadable|reads back different)\)", msg))
        assert leaves <= stored, msg
        assert leaves or "every leaf's array still reads back" in msg, msg
        named.append(leaves)
  # Some damage ruins one array and not the others, and the message says which.
  assert any(0 < len(n) < len(stored) for n in named), named
  _which(checkpoint.restore(good))


def test_a_truncated_file_is_caught_without_checksums(tmp_path):
  good = tmp_path / "good"
  checkpoint.save(good, _tree(0))
  for rel in ("arrays/manifest.ocdbt", "arrays/_METADATA"):
    bad = tmp_path / "bad"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(good, bad)
    with open(bad / rel, "r+b") as f:
      f.truncate(os.path.getsize(bad / rel) // 2)
    with pytest.raises(checkpoint.CheckpointCorruptedError,
                       match=os.path.basename(rel) + r" \(size \d+, saved \d+\)"):
      checkpoint.restore(bad, verify=False)  # sizes are checked without reading


def test_damaged_data_is_caught_by_leaf_checksums(tmp_path, monkeypatch):
  d = tmp_path / "ck"
  checkpoint.save(d, _tree(0))
  meta = json.loads((d / "lowbit_jax.json").read_text())
  # Another writer's checksum for leaf "w": files match, the array does not.
  meta["leaves"][0]["fields"]["codes"]["sha256"] = "0" * 64
  meta["sha256"] = checkpoint._meta_digest(meta)
  (d / "lowbit_jax.json").write_text(json.dumps(meta))
  with pytest.raises(checkpoint.CheckpointCorruptedError, match=r"leaves 'w/codes'"):
    checkpoint.restore(d)
  _which(checkpoint.restore(d, verify=False))  # verification can be skipped


def test_metadata_that_contradicts_the_arrays_is_rejected(tmp_path):
  d = tmp_path / "ck"
  checkpoint.save(d, _tree(0))
  meta = json.loads((d / "lowbit_jax.json").read_text())
  leaf = next(m for m in meta["leaves"] if m["kind"] != "array"
              and m["spec"]["format"].get("format") == "int4")
  leaf["spec"]["group_size"] = 16  # the stored scales are per 32
  meta["sha256"] = checkpoint._meta_digest(meta)
  (d / "lowbit_jax.json").write_text(json.dumps(meta))
  with pytest.raises(checkpoint.CheckpointCorruptedError,
                     match=r"leaf 'w' stores scale as \(\(32, 2\)"):
    checkpoint.restore(d)
  (d / "lowbit_jax.json").write_text("{not json")
  with pytest.raises(checkpoint.CheckpointCorruptedError,
                     match="lowbit_jax.json is damaged"):
    checkpoint.restore(d)


def test_concurrent_saves_one_wins_the_other_is_told(tmp_path, monkeypatch):
  d = tmp_path / "ck"
  checkpoint.save(d, _tree(0))
  inside, go = threading.Event(), threading.Event()
  orig = checkpoint._write_arrays

  def slow_write(*a):
    inside.set()
    assert go.wait(30)
    orig(*a)
  monkeypatch.setattr(checkpoint, "_write_arrays", slow_write)
  errors = []
  t = threading.Thread(target=lambda: errors.append(
      checkpoint.save(d, _tree(1), force=True)))
  t.start()
  assert inside.wait(30)
  with pytest.raises(checkpoint.SaveInProgressError,
                     match="another save to .*ck is in progress"):
    checkpoint.save(d, _tree(0), force=True)
  go.set()
  t.join()
  assert errors == [None]
  assert _which(checkpoint.restore(d)) == 1
  assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_force_never_deletes_a_directory_that_is_not_a_checkpoint(tmp_path):
  d = tmp_path / "mine"
  d.mkdir()
  (d / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not a lowbit_jax checkpoint"):
    checkpoint.check_save_target(d, force=True)   # before a long computation
  with pytest.raises(FileExistsError, match="pass force=True"):
    checkpoint.check_save_target(d)
  with pytest.raises(ValueError, match="not a lowbit_jax checkpoint"):
    checkpoint.save(d, _tree(0), force=True)
  assert (d / "notes.txt").read_text() == "keep me"
  (d / "arrays").mkdir()  # looks like a damaged checkpoint, but holds more
  with pytest.raises(ValueError, match="not a lowbit_jax checkpoint"):
    checkpoint.save(d, _tree(0), force=True)
  assert (d / "notes.txt").read_text() == "keep me"
  (d / "arrays" / "mine.npy").write_bytes(b"x")   # a user's own arrays/ folder
  (d / "notes.txt").unlink()
  with pytest.raises(ValueError, match="not a lowbit_jax checkpoint"):
    checkpoint.save(d, _tree(0), force=True)
  assert (d / "arrays" / "mine.npy").read_bytes() == b"x"
  (d / "arrays" / "mine.npy").unlink()
  # arrays/ alone (empty, or orbax's): a checkpoint that lost its metadata
  checkpoint.save(d, _tree(1), force=True)
  assert _which(checkpoint.restore(d)) == 1
  os.remove(d / "lowbit_jax.json")   # orbax's arrays/ without the metadata
  checkpoint.save(d, _tree(0), force=True)
  assert _which(checkpoint.restore(d)) == 0


def test_extra_files_are_replaced_with_the_checkpoint(tmp_path, monkeypatch):
  d, old = tmp_path / "ck", tmp_path / "old"
  checkpoint.save(old, _tree(0), extra_files={"run.json": '{"seed": 0}'})
  for k in range(1, 8):
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(old, d)
    with monkeypatch.context() as m:
      _inject(m, k)
      try:
        checkpoint.save(d, _tree(1), force=True,
                        extra_files={"run.json": b'{"seed": 1}'})
      except _Boom:
        pass
    seed = _which(checkpoint.restore(d))
    assert json.loads((d / "run.json").read_text()) == {"seed": seed}, k
  for bad in ("lowbit_jax.json", "arrays", "a/b", ".hidden"):
    with pytest.raises(ValueError, match="must be a plain file name"):
      checkpoint.save(tmp_path / "x", _tree(0), extra_files={bad: "x"})


def test_a_symlink_is_saved_where_it_points(tmp_path):
  real, link = tmp_path / "real", tmp_path / "latest"
  checkpoint.save(real, _tree(0))
  os.symlink(real, link)
  checkpoint.save(link, _tree(1), force=True)
  assert os.path.islink(link) and _which(checkpoint.restore(link)) == 1
  assert _which(checkpoint.restore(real)) == 1
  assert sorted(os.listdir(tmp_path)) == ["latest", "real"]


@pytest.mark.parametrize("name", ["run%41", "run#1", "a b"])
def test_damage_reports_read_leaves_under_any_path(tmp_path, name):
  d = tmp_path / name
  checkpoint.save(d, _tree(0))
  meta = checkpoint._read_meta(str(d))
  names = [None] * len(meta["leaves"])
  checkpoint._leaf_paths(meta["skeleton"], "", names)
  assert checkpoint._damaged_leaves(str(d), meta["leaves"], names) == []
  _flip(d / "arrays" / "_METADATA", 5)
  with pytest.raises(checkpoint.CheckpointCorruptedError,
                     match="every leaf's array still reads back"):
    checkpoint.restore(d)


@pytest.mark.parametrize("verify", [True, False])
def test_a_restore_overlapping_a_save_reads_one_whole_checkpoint(
    tmp_path, monkeypatch, verify):
  # The metadata is read from the old checkpoint, then a save replaces it
  # before the arrays are read: restore notices and reads the new one whole.
  d = tmp_path / "ck"
  checkpoint.save(d, _tree(0))
  orig, calls = checkpoint._read_meta, []

  def read_then_replace(directory):
    meta = orig(directory)
    calls.append(1)
    if len(calls) == 1:
      checkpoint.save(d, _tree(1), force=True)
    return meta
  monkeypatch.setattr(checkpoint, "_read_meta", read_then_replace)
  assert _which(checkpoint.restore(d, verify=verify)) == 1
  assert len(calls) == 2


def test_extra_files_are_read_with_their_arrays(tmp_path, monkeypatch):
  # restore(files=) reads the extra files in the same attempt as the arrays,
  # so a save between the two never pairs one checkpoint's file with
  # another's arrays.
  d = tmp_path / "ck"
  checkpoint.save(d, _tree(0), extra_files={"run.json": '{"seed": 0}'})
  orig, calls = checkpoint._restore_once, []

  def restore_then_replace(*a, **k):
    out = orig(*a, **k)
    calls.append(1)
    if len(calls) == 1:
      checkpoint.save(d, _tree(1), force=True, extra_files={"run.json": '{"seed": 1}'})
    return out
  monkeypatch.setattr(checkpoint, "_restore_once", restore_then_replace)
  tree, files = checkpoint.restore(d, files=("run.json",))
  assert json.loads(files["run.json"]) == {"seed": _which(tree)} == {"seed": 1}
  with pytest.raises(FileNotFoundError, match="has no file 'other.json'"):
    checkpoint.restore(d, files=("other.json",))


@pytest.mark.parametrize("name", ["run[1]/ck", "sweep[lr=1e-3]/ck", "run\\2"])
def test_paths_orbax_cannot_keep_arrays_under_are_refused(tmp_path, name):
  # Orbax globs its own directory ([1] is a character class there) and
  # tensorstore splits paths at a backslash: such a save wrote an unreadable
  # checkpoint and returned normally, with force=True over a good one.
  from lowbit_jax.train import state  # pylint: disable=g-import-not-at-top
  d = tmp_path / name
  match = "glob pattern|backslash"
  with pytest.raises(ValueError, match=match):
    checkpoint.check_save_target(d)
  with pytest.raises(ValueError, match=match):
    checkpoint.save(d, _tree(0))
  assert sorted(os.listdir(tmp_path)) == []
  # A good checkpoint moved there is named as unreadable there, and kept.
  checkpoint.save(tmp_path / "good", _tree(0))
  d.parent.mkdir(exist_ok=True)
  os.rename(tmp_path / "good", d)
  with pytest.raises(ValueError, match=match):
    checkpoint.save(d, _tree(1), force=True)
  with pytest.raises(ValueError, match=match):
    checkpoint.restore(d)
  os.rename(d, tmp_path / "back")
  assert _which(checkpoint.restore(tmp_path / "back")) == 0
  with pytest.raises(ValueError, match=match):   # a training run's checkpoints
    state.checkpoint_manager(d / "checkpoints")


def test_another_checkpoints_leftovers_are_not_taken_for_ours(tmp_path):
  # A save of "ck.old-1" killed before its swap leaves ".ck.old-1.tmp-*",
  # which starts like a leftover of "ck" (".ck.old-"): restore("ck") returned
  # its arrays, and save("ck") moved it into place and refused to overwrite.
  foreign = tmp_path / ".ck.old-1.tmp-123-abcdef12"
  checkpoint.save(tmp_path / "src", _tree(1))
  os.rename(tmp_path / "src", foreign)
  with pytest.raises(ValueError, match="not a lowbit_jax checkpoint"):
    checkpoint.restore(tmp_path / "ck")
  checkpoint.save(tmp_path / "ck", _tree(0))
  assert _which(checkpoint.restore(tmp_path / "ck")) == 0
  assert _which(checkpoint.restore(foreign)) == 1   # not touched


def test_damaged_extra_files_are_caught(tmp_path):
  # Extra files (a run's metadata, read to rebuild its model) were returned
  # unchecked: a flipped bit turned vocab 8192 into 9192.
  d = tmp_path / "ck"
  checkpoint.save(d, _tree(0), extra_files={"run.json": '{"vocab": 8192}'})
  _, files = checkpoint.restore(d, files=("run.json",))
  assert json.loads(files["run.json"]) == {"vocab": 8192}
  (d / "run.json").write_bytes(b'{"vocab": 9192}')
  with pytest.raises(checkpoint.CheckpointCorruptedError, match="run.json.*checksum"):
    checkpoint.restore(d, files=("run.json",))
  (d / "run.json").write_bytes(b'{"vocab": 81920}')   # caught without checksums too
  with pytest.raises(checkpoint.CheckpointCorruptedError, match="run.json.*size 16"):
    checkpoint.restore(d, files=("run.json",), verify=False)


def test_names_too_long_for_the_temporaries_beside_them_are_refused(tmp_path):
  from lowbit_jax import _io  # pylint: disable=g-import-not-at-top
  limit = os.pathconf(tmp_path, "PC_NAME_MAX")
  with pytest.raises(ValueError, match=f"use a name of at most {limit - 22} bytes"):
    checkpoint.save(tmp_path / ("r" * (limit - 10)), _tree(0))
  checkpoint.save(tmp_path / ("r" * (limit - 22)), _tree(0))
  # An atomic file write takes any legal name (its temporary's is short).
  _io.write_atomic(tmp_path / ("j" * limit), "{}")
  assert (tmp_path / ("j" * limit)).read_text() == "{}"
