"""A run whose fine-tuned model validates below its own linear probe says so (validation only)."""

from transferkit.finetune import below_probe_warning


def test_a_fine_tuned_model_below_the_probe_on_validation_is_named_with_both_accuracies():
    probe = {"history": [{"val_accuracy": 0.70}, {"val_accuracy": 0.80}], "best_epoch": 2}
    tuned = [{"val_accuracy": 0.60}, {"val_accuracy": 0.75}, {"val_accuracy": 0.72}]
    warning = below_probe_warning(probe, tuned, 2, "lora")
    assert "fine-tuned (lora) validation accuracy 0.7500 is below the linear probe's 0.8000" in warning
    assert below_probe_warning(probe, [{"val_accuracy": 0.80}], 1, "full") is None  # equal is not below
    assert below_probe_warning({"history": [], "best_epoch": None}, tuned, 2, "full") is None
    # Test accuracies play no part: only validation records are read.
    assert below_probe_warning({**probe, "test": {"accuracy": 0.99}}, [{"val_accuracy": 0.9}], 1, "full") is None
