"""Networks: the Glow density prior and bits per dimension, classifiers, the simplifier."""
