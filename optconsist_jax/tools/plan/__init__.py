"""The TPU planner: `python -m optconsist_jax.tools.plan` (__main__.py) over aot.py
(ahead-of-time compiles for a TPU topology on a CPU machine), hlo_stats.py
(memory and collectives read from the compiled HLO), step_time.py (roofline
step-time estimates) and search.py (ranking sharding layouts)."""
