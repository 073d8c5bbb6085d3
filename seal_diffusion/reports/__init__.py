"""Whole studies with a report and figures: the robustness matrix (every attack against a key), compare (base / C /
C_p / no passport / exported side by side), the σ sweep, and every plot.

The top floor of the library: it may import every subpackage; only ``demo``, ``ui`` and ``cli`` import it.
"""
