"""The command line: parsing, settings at the edge, tables, JSON and progress bars."""
