"""Sequence Span Rewriting at scale: the teacher on the mesh (teacher.py), the online input
stage (online.py), offline generate-spans and its task (offline.py)."""
