"""Sweeps: a grid of prune and compile options over one model, one dense export, each variant a Ray task.

``spec`` (the sweep file and its variants), ``cache`` (the dense-export cache), ``task`` (one variant's
work inside a Ray task), ``run`` (the Ray driver), ``report`` (sweep.json + sweep.html), ``tracking`` (the
MLflow hook). Ray and MLflow are optional extras, imported only when a sweep runs.
"""
