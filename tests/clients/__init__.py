"""The client library: its math, HTTP retries and keys, data files and evaluation."""
