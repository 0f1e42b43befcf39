"""Numbers from maintained libraries, checked against what the hand-written code they replaced
computed on the same inputs (recorded here): classification metrics (scikit-learn); integrated
gradients (Captum) against what they must satisfy.
WER and CER (jiwer): test_speech.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from raytune_ft.post.explain import integrated_gradients
from raytune_ft.tasks import ClassificationMetrics

# confusion matrix (rows true, columns predicted), summed loss -> accuracy, macro-F1, mean loss as
# the hand-written confusion-matrix arithmetic computed them
COMPUTED_BEFORE_SKLEARN = {
    "balanced": ([[40, 8], [6, 42]], 31.5, (0.8541666666666666, 0.8541033434650456, 0.328125)),
    "a class never predicted": ([[10, 0, 5], [3, 0, 9], [0, 0, 20]], 40.0, (0.6382978723404256, 0.48500881834215165, 0.851063829787234)),
    "a class absent, yet predicted": ([[12, 2, 1], [0, 0, 0], [4, 3, 9]], 18.25, (0.6774193548387096, 0.7332506203473945, 0.5887096774193549)),
}


@pytest.mark.parametrize("case", COMPUTED_BEFORE_SKLEARN)
def test_sklearn_scores_the_reduced_confusion_matrix_as_before(case):
    confusion, loss_sum, (accuracy, macro_f1, loss) = COMPUTED_BEFORE_SKLEARN[case]
    metrics = ClassificationMetrics(len(confusion))
    state = torch.tensor([count for row in confusion for count in row] + [loss_sum], dtype=torch.float64)
    result = metrics.compute(state)
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-15)
    assert result["macro_f1"] == pytest.approx(macro_f1, abs=1e-15)
    assert result["loss"] == loss and result["confusion"] == confusion and result["count"] == sum(map(sum, confusion))
    # Two ranks' sums (the all-reduce): the same rates
    assert metrics.compute(state + state)["macro_f1"] == pytest.approx(macro_f1, abs=1e-15)


def test_an_empty_evaluation_scores_zero():
    result = ClassificationMetrics(3).compute(torch.zeros(10, dtype=torch.float64))
    assert (result["accuracy"], result["macro_f1"], result["loss"], result["count"]) == (0.0, 0.0, 0.0, 0)


def test_captum_integrated_gradients_are_exact_on_a_linear_model_and_refine_on_a_saturated_one():
    """Attributions of a linear model are (x - x0) * w at once; a saturating one doubles its steps
    until the attributions sum to F(x) - F(x0) within the tolerance (completeness)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 3)
    x, x0 = torch.randn(6), torch.zeros(6)
    options = SimpleNamespace(method="integrated_gradients", steps=4, tolerance=0.01)
    result = integrated_gradients(linear, x, x0, 2, options)
    torch.testing.assert_close(result["attributions"], (x - x0) * linear.weight[2].detach())
    assert result["steps"] == 4 and result["completeness_error"] < 1e-5

    saturated = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    for parameter in saturated.parameters():
        parameter.data *= 6
    result = integrated_gradients(saturated, x, x0, 1, SimpleNamespace(method="integrated_gradients", steps=2, tolerance=0.01))
    assert result["steps"] > 2 and result["completeness_error"] <= 0.01 * abs(result["logit_difference"])
    one_step = integrated_gradients(saturated, x, x0, 1, SimpleNamespace(method="gradient_x_input", steps=2, tolerance=0.01))
    assert one_step["steps"] == 1 and one_step["attributions"].shape == x.shape
