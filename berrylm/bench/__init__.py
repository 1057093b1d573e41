"""Benchmarks that print ratios against a peer measured in the same run (`berry bench NAME`)."""
