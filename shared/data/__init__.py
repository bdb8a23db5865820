"""Data sources: built-in populations written as user device folders, and the folder reader."""
