"""Test-only helpers: the S3 fault-injecting proxy (`faultproxy`). Nothing runs at import.

The local S3 server that tests and benches share lives in `genpt_dist.local_s3`."""
