"""Archives in S3-compatible object storage: ``s3://BUCKET/KEY`` outputs and inputs.

Everything here imports boto3 only when an ``s3://`` name is used (see client.py), so a
command that never meets one starts as fast as before. The modules:

- names.py: parsing ``s3://BUCKET/KEY`` and ``s3://BUCKET/PREFIX``.
- client.py: the boto3 client (the standard credential chain) and one-line errors.
- upload.py: :class:`S3Output`, the archive output as a multipart upload.
- objects.py: reading objects: a stream for restore/verify/config, and a seekable file
  over ranged GETs for ``info`` and the trailing index.
- bucket.py: listing archives and stale uploads under a prefix (retention, prune).
"""

SCHEME = "s3://"

