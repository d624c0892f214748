"""`python -m lib_copier evaluate`: measure the method — naive vs copier vs extraction, per effect.

- metrics.py: image measures (per-effect metrics, layout similarity, PSNR), numpy and PIL only.
- train.py: the three methods' LoRAs for a set of originals and effects.
- measure.py: render at every weight and turn the images into numbers (results.json).
- run.py: one evaluation from start to end; workers.py: the one-thread processes it runs in.
- report.py, figures.py, charts.py: the Markdown report with its strength grids and charts (PIL).
- cli.py: the command.
"""
