"""distinct-n, unique answers and unique traces against hand-counted values."""
import pytest

from memdyn_jax.metrics import diversity as dv


def test_distinct_n_strings_hand_counted():
  samples = ["a b a", "a b c"]
  # Unigrams: 6 total, {a, b, c}.
  assert dv.distinct_n(samples, 1) == pytest.approx(3 / 6)
  # Bigrams: (a b) (b a) | (a b) (b c) -> 4 total, 3 unique; (a, a) across samples excluded.
  assert dv.distinct_n(samples, 2) == pytest.approx(3 / 4)


def test_distinct_n_token_ids_and_short_samples():
  assert dv.distinct_n([[1, 2], [1, 2]], 2) == 0.5
  assert dv.distinct_n([[1, 2], [1, 2]], 3) == 0.0
  assert dv.distinct_n([], 1) == 0.0
  assert dv.distinct_n(["x", ""], 1) == 1.0


def test_unique_final_answers():
  answers = ["72", " 72", "8", None, None]
  assert dv.unique_final_answers(answers) == 2
  assert dv.unique_final_answers(answers, count_unparseable=True) == 3
  assert dv.unique_final_answers([None]) == 0


def test_unique_traces():
  assert dv.unique_traces(["a  b", "a b\n", "a c"]) == 2
  assert dv.unique_traces(["a  b", "a b\n", "a c"], normalize_whitespace=False) == 3
  assert dv.unique_traces([[1, 2], (1, 2), [2, 1]]) == 2


def test_diversity_summary():
  d = dv.sample_diversity(["a b a", "a b c"], ["3", "3"])
  assert d == dv.Diversity(distinct_1=0.5, distinct_2=0.75, unique_answers=1,
                           unique_traces=2, num_samples=2)


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="n must"):
    dv.distinct_n(["a"], 0)
  with pytest.raises(ValueError, match=r"samples\[1\]"):
    dv.distinct_n(["a", 3], 1)
  with pytest.raises(ValueError, match="answers"):
    dv.sample_diversity(["a", "b"], ["1"])
