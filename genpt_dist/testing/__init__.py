"""Helpers shared by the tests and the benchmarks (a real local S3 endpoint); nothing runs at import."""

from genpt_dist.testing.s3server import MotoS3Server, start_s3_server

__all__ = ["MotoS3Server", "start_s3_server"]
