"""Over-memorization detector on synthetic curves, and checkpoint selection."""
import numpy as np
import pytest

from memdyn_jax.metrics import overmemorization as om
from memdyn_jax.metrics.overmemorization import OverMemorizationConfig

# Test perplexity falls to 1.5 at m=2, then rises; accuracy plateaus around 0.55.
#   running min:  3, 2, 1.5, 1.5, 1.5, 1.5, 1.5  -> rise >= 10% at m = 4, 5, 6 (1.6 is 6.7%)
#   running best: .1, .4, .55, .56, .56, .56, .56 -> within 2 points at m = 2, 3, 4, 6
PPL = np.array([3.0, 2.0, 1.5, 1.6, 1.8, 2.0, 2.2])
ACC = np.array([0.10, 0.40, 0.55, 0.56, 0.55, 0.50, 0.56])
STEPS = np.arange(7) * 100


def test_detector_running_reference_hand_computed():
  det = om.detect_overmemorization(PPL, ACC, STEPS)
  np.testing.assert_array_equal(det.flags, [0, 0, 0, 0, 1, 0, 1])
  assert det.stages == ((4, 4), (6, 6))
  assert det.stage_steps == ((400, 400), (600, 600))
  assert det.onset == 4
  np.testing.assert_allclose(det.ppl_rise, [0, 0, 0, 0.1 / 1.5, 0.2, 0.5 / 1.5, 0.7 / 1.5])
  np.testing.assert_allclose(det.acc_gap, [0, 0, 0, 0, 0.01, 0.06, 0.0], atol=1e-12)


def test_detector_accuracy_tolerance_merges_stage():
  det = om.detect_overmemorization(PPL, ACC, STEPS, OverMemorizationConfig(max_acc_drop=0.1))
  assert det.stages == ((4, 6),)
  assert det.stage_steps == ((400, 600),)
  np.testing.assert_array_equal(det.in_stage, [0, 0, 0, 0, 1, 1, 1])


def test_min_stage_len_drops_short_runs():
  det = om.detect_overmemorization(PPL, ACC, config=OverMemorizationConfig(min_stage_len=2))
  np.testing.assert_array_equal(det.flags, [0, 0, 0, 0, 1, 0, 1])
  assert det.stages == ()
  assert not det.in_stage.any()
  assert det.onset is None


def test_overfitting_with_accuracy_collapse_is_not_over_memorization():
  # Perplexity rises but accuracy falls with it: classic overfitting, no stage.
  det = om.detect_overmemorization([2.0, 1.5, 1.8, 2.5], [0.3, 0.6, 0.4, 0.2])
  assert not det.flags.any()


def test_overall_reference_only_flags_after_minimum():
  ppl = [1.2, 2.0, 1.0, 1.3]
  acc = [0.5, 0.5, 0.5, 0.5]
  running = om.detect_overmemorization(ppl, acc)
  np.testing.assert_array_equal(running.flags, [0, 1, 0, 1])
  overall = om.detect_overmemorization(ppl, acc, config=OverMemorizationConfig(
      reference="overall"))
  # 1.2 and 2.0 exceed 1.1·min but precede the minimum at m=2.
  np.testing.assert_array_equal(overall.flags, [0, 0, 0, 1])
  assert overall.stages == ((3, 3),)


def test_select_pre_stage_best_acc():
  det = om.detect_overmemorization(PPL, ACC, STEPS)
  # Before onset 4 the best is 0.56 at m=3 (m=6 ties but is in the stage).
  assert om.select_checkpoint("pre_stage_best_acc", test_acc=ACC, detection=det) == 3
  no_stage = om.detect_overmemorization([3.0, 2.0, 1.5], [0.2, 0.5, 0.5])
  # Ties go to the earliest checkpoint.
  assert om.select_checkpoint("pre_stage_best_acc", test_acc=[0.2, 0.5, 0.5],
                              detection=no_stage) == 1


def test_select_max_train_premem():
  assert om.select_checkpoint("max_train_premem", train_premem=[0.1, 0.5, 0.5, 0.3]) == 1


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="test_acc"):
    om.detect_overmemorization(PPL, ACC[:-1])
  with pytest.raises(ValueError, match="test_perplexity"):
    om.detect_overmemorization(PPL[None], ACC[None])
  with pytest.raises(ValueError, match="steps"):
    om.detect_overmemorization(PPL, ACC, steps=[0, 1])
  with pytest.raises(ValueError, match="min_ppl_rise"):
    OverMemorizationConfig(min_ppl_rise=0.0)
  with pytest.raises(ValueError, match="reference"):
    OverMemorizationConfig(reference="global")
  det = om.detect_overmemorization(PPL, ACC)
  with pytest.raises(ValueError, match="detection"):
    om.select_checkpoint("pre_stage_best_acc", test_acc=ACC)
  with pytest.raises(ValueError, match="test_acc"):
    om.select_checkpoint("pre_stage_best_acc", test_acc=ACC[:3], detection=det)
  with pytest.raises(ValueError, match="train_premem"):
    om.select_checkpoint("max_train_premem")
  with pytest.raises(ValueError, match="rule"):
    om.select_checkpoint("lowest_loss", test_acc=ACC, detection=det)
