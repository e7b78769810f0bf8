"""Reports: JSON, markdown tables and plots of search results."""

from dnis.app.report.search_report import metric_table, write_search_report

__all__ = ["metric_table", "write_search_report"]
