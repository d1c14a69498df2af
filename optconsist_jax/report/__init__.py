"""The study's report: frontiers, consistency estimands, intervals, figures.

`python -m optconsist_jax.report W1 W2 ... --out DIR` (__main__.py) over
tables.py (Pareto tables and the consistency summary), consistency.py
(frontiers and gaps at equal learning), statistics.py (intervals over seeds)
and plots.py (figures). It reads the eval job's results only.
"""
