"""The statistics, report and plots of `ssr-jax compare`: `scores` bootstraps each task's
metrics over examples (a mean and 95% interval per arm, the spread over fine-tuning seeds, a
paired bootstrap of every arm against the span-corruption baseline with its p-value and a
verdict), `report` writes results.json and report.md from one results dict (its schema is
in that module's docstring), and `plots` draws the PNGs the report embeds (pre-training
loss per arm, the teacher's fill statistics, each task's primary metric with intervals).
Library code with plain arguments: the `compare` command in cli/ runs the stages and fills
the results dict; matplotlib is imported only when plots are drawn.
"""
