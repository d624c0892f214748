"""Measuring the method (issue 8): naive vs copier vs extraction, per effect.

metrics.py holds the image measures (per-effect metrics, layout similarity, PSNR), numpy and PIL only. The
`evaluate` command that renders and reports with them is still being built.
"""
