"""Explanations a researcher would otherwise run, as peers for SimpleBits (issue 12).

One module per method, each on a batch ``(N, 1, H, W)`` in ``[0, 1]``, explaining the classifier's
log-odds of the positive class (:mod:`~pipeline.explain.target`):

- :mod:`~pipeline.explain.integrated_gradients` and :mod:`~pipeline.explain.occlusion` (Captum);
- :mod:`~pipeline.explain.gradcam` (Captum ``LayerGradCam``);
- :mod:`~pipeline.explain.latent_shift` (Gifsplanation's counterfactual in the Glow prior's latent space).

:mod:`~pipeline.explain.run` is ``simplebits explain`` (per-study ``.npy`` + overlay ``.png``,
resumable); :mod:`~pipeline.explain.localisation` scores a map against a ground-truth mask.
"""
