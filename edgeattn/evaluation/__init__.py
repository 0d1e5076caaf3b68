"""Evaluation on the compiler side: perplexity and the quality report of a rewrite, validate, calibration texts.

Needs torch (the PyTorch model is the reference); the on-device golden check lives in ``edgeattn.runtimes``.
"""
