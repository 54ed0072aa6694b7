"""The build: the decoder export, the parts, the stitch passes, writing and checking one combined folder.

Entry point: :func:`merge.stitch.pipeline.build`.
"""
