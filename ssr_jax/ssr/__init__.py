"""Sequence Span Rewriting at scale: one input stage with two example sources (stage.py), the
teacher on the student's mesh (teacher.py), offline generate-spans and its task (offline.py),
the run's SSR as data (spec.py) and its statistics (stats.py)."""
