"""Checkpoint I/O: directory facts, header scan and reader, streaming writer, atomic output, pipeline, manifest."""
