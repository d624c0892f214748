"""`python -m lib_copier evaluate`: measure the method — naive vs copier vs extraction, per effect.

- metrics.py: image measures (per-effect metrics, layout similarity, PSNR), numpy and PIL only.
- render.py: batched generation with LoRAs, so hundreds of evaluation images stay cheap on a CPU.
- train.py: the three methods' LoRAs for a set of originals and effects.
- measure.py: render at every weight and turn the images into numbers (results.json).
- charts.py, report.py: the Markdown report with its strength grids and charts.
- cli.py: the command.
"""
