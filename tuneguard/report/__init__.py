"""Reports: terminal tables, report.md/html/json with plots, and the run history."""
