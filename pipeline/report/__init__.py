"""The report: the recommendation rule, the Markdown text, its figures, and feature stability between configs."""
