"""Figures and the generated ANALYSIS_REPORT.md."""
