"""Tests of the Python-stdlib corpus, its split, tokenizer and batches."""
import numpy as np
import pytest

from lowbit_jax.data import stdlib_corpus as sc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("lowbit_cache")


@pytest.fixture(scope="module")
def tokenizer(cache):
  return sc.get_tokenizer(1024, cache_dir=cache)


def test_files_exclude_tests_site_packages_and_large_files():
  root = sc.stdlib_root()
  files = sc.list_files()
  assert files == sorted(files) and len(files) == len(set(files)) > 100
  assert "os.py" in files and "json/decoder.py" in files
  for rel in files:
    parts = rel.split("/")
    assert rel.endswith(".py")
    assert not {"test", "tests", "idle_test", "site-packages",
                "dist-packages"} & set(parts[:-1]), rel
    assert (root / rel).stat().st_size <= sc.MAX_FILE_BYTES


def test_split_is_a_fixed_function_of_the_path():
  # Fixed expectations: SHA-256 of the relative path decides, on every machine.
  expected = {"os.py": "train", "typing.py": "train", "json/decoder.py": "train",
              "chunk.py": "heldout", "copyreg.py": "heldout",
              "traceback.py": "heldout", "email/__init__.py": "heldout"}
  for path, split in expected.items():
    assert sc.split_of(path) == split
  assert sc.split_of("json/decoder.py", 0.5) == "heldout"
  with pytest.raises(ValueError, match="heldout_fraction"):
    sc.split_of("os.py", 1.0)


def test_splits_are_disjoint_cover_all_files_and_are_deterministic():
  train = sc.load_corpus("train")
  heldout = sc.load_corpus("heldout")
  train_paths = {d.path for d in train}
  heldout_paths = {d.path for d in heldout}
  assert not train_paths & heldout_paths
  assert train_paths | heldout_paths == set(sc.list_files())
  assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.10
  again = sc.load_corpus("heldout")
  assert [(d.path, d.text) for d in again] == [(d.path, d.text) for d in heldout]
  root = sc.stdlib_root()
  assert heldout[0].text == (root / heldout[0].path).read_text(encoding="utf-8")
  with pytest.raises(ValueError, match="split must be one of"):
    sc.load_corpus("validation")


def test_tokenizer_training_is_deterministic_and_round_trips_heldout():
  texts = [d.text for d in sc.load_corpus("train")[:40]]
  a = sc.train_tokenizer(texts, 600)
  b = sc.train_tokenizer(texts, 600)
  assert a.to_str() == b.to_str()
  assert a.get_vocab_size() == 600 and a.token_to_id(sc.EOS) == 0
  for doc in sc.load_corpus("heldout"):
    assert a.decode(a.encode(doc.text).ids) == doc.text, doc.path
  odd = "x = 'héllo 🐍'\n\t\tpass  \r\n\x00"
  assert a.decode(a.encode(odd).ids) == odd
  # The EOS token's text inside a document is text: no fake document boundary,
  # and its bytes count for bits per byte.
  literal = "a<|endoftext|>b"
  ids = a.encode(literal, add_special_tokens=False).ids
  assert a.decode(ids) == literal and a.token_to_id(sc.EOS) not in ids
  stream = sc.encode_documents([sc.Document("x.py", literal)], a)
  assert list(stream).count(a.token_to_id(sc.EOS)) == 1
  assert int(sc.token_byte_lengths(a)[stream].sum()) == len(literal.encode())
  with pytest.raises(ValueError, match="vocab_size"):
    sc.train_tokenizer(texts, 100)


def test_cached_tokenizer_and_streams(cache, tokenizer):
  key_dir = sc.corpus_dir(1024, cache_dir=cache)
  assert (key_dir / "tokenizer.json").exists()
  assert tokenizer.get_vocab_size() == 1024
  heldout = sc.token_stream("heldout", tokenizer, cache_dir=cache)
  assert heldout.dtype == np.uint16 and heldout[0] == 0
  # The cache returns the same stream; the stream is the documents joined by EOS.
  np.testing.assert_array_equal(
      sc.token_stream("heldout", tokenizer, cache_dir=cache), heldout)
  docs = sc.load_corpus("heldout")
  assert int((heldout == 0).sum()) == len(docs)
  first_end = int(np.flatnonzero(heldout == 0)[1])
  assert tokenizer.decode(heldout[1:first_end].tolist()) == docs[0].text
  # Bits per byte support: token byte lengths add up to the split's size.
  lengths = sc.token_byte_lengths(tokenizer)
  assert lengths[0] == 0
  assert int(lengths[heldout].sum()) == sc.split_num_bytes("heldout")
  assert sc.split_num_bytes("heldout") == sum(
      len(d.text.encode("utf-8")) for d in docs)
  # Another vocabulary size is another cache entry.
  assert sc.corpus_key(1024) != sc.corpus_key(2048)


def test_corpus_key_tracks_file_contents(tmp_path):
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / "tests").mkdir()
  (tmp_path / "tests" / "t.py").write_text("y = 2\n")
  assert sc.list_files(tmp_path) == ["a.py"]
  key = sc.corpus_key(1024, root=tmp_path)
  assert key == sc.corpus_key(1024, root=tmp_path)
  (tmp_path / "a.py").write_text("x = 2\n")
  assert sc.corpus_key(1024, root=tmp_path) != key
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .py files"):
    sc.list_files(tmp_path / "empty")


def test_batches_are_deterministic_windows_and_resume_exactly():
  tokens = np.arange(1000, dtype=np.uint16)
  it = sc.batches(tokens, 4, 16, seed=3)
  first = [next(it) for _ in range(5)]
  for b in first:
    assert b.shape == (4, 17) and b.dtype == np.int32
    # Windows are contiguous slices of the stream.
    np.testing.assert_array_equal(np.diff(b, axis=1), 1)
  resumed = sc.batches(tokens, 4, 16, seed=3, start_step=3)
  np.testing.assert_array_equal(next(resumed), first[3])
  other = next(sc.batches(tokens, 4, 16, seed=4))
  assert not np.array_equal(other, first[0])
  with pytest.raises(ValueError, match="fewer than one window"):
    sc.batches(tokens[:10], 2, 16, seed=0)


def test_bad_root_raises(tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    sc.list_files(tmp_path / "missing")


def test_near_copies_lists_held_out_files_seen_in_training(tmp_path):
  # Path-hashed splits put template-generated files on both sides (the
  # stdlib's codec tables): held-out perplexity is optimistic there.
  text = "".join(f"line_{i} = {i}\n" for i in range(40))
  names = [f"m{i}.py" for i in range(40)]
  for n in names:
    (tmp_path / n).write_text(text)
  (tmp_path / "unique.py").write_text("something = 'else'\n")
  held = [n for n in names if sc.split_of(n) == "heldout"]
  assert held and len(held) < len(names)
  got = sc.near_copies(root=tmp_path)
  assert [p for p, _, _ in got] == sorted(held)
  assert all(f == 1.0 and b == len(text) for _, f, b in got)
  with pytest.raises(ValueError, match="threshold"):
    sc.near_copies(0.0, root=tmp_path)


def test_a_negative_data_seed_is_refused_by_name():
  tokens = np.arange(100, dtype=np.uint16)
  with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
    sc.batch_at(tokens, 0, 2, 8, -1)
