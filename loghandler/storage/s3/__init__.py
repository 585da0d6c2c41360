"""
S3: the low-level client (:mod:`.api` names its calls; :mod:`.client` makes them over
treq and botocore) and the per-object writer that stages and merges
(:mod:`.writer`, :mod:`.merge`), DESIGN.md sections 5 and 7.
"""
