"""SimpleBits settings: joint training (a), condensation (b), post-hoc audit (c), baselines, evaluation."""
