"""The storage seam against a local folder and a real S3 endpoint (moto_server over HTTP)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from genpt_dist import storage
from genpt_dist.errors import UserError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh folder URL: a local path or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return storage.join(request.getfixturevalue("bucket"), "root")


def test_round_trip_list_and_delete(root):
    storage.write_bytes(storage.join(root, "a/b.bin"), b"\x00\x01binary")
    storage.write_text(storage.join(root, "a/c.txt"), "héllo\n")
    storage.write_json(storage.join(root, "meta.json"), {"step": 3, "url": root})
    storage.write_bytes(storage.join(root + "-sibling", "x"), b"not under root")

    assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"\x00\x01binary"
    assert storage.read_text(storage.join(root, "a/c.txt")) == "héllo\n"
    assert storage.read_json(storage.join(root, "meta.json")) == {"step": 3, "url": root}
    assert storage.exists(storage.join(root, "a/c.txt"))
    assert not storage.exists(storage.join(root, "a/missing"))
    assert storage.size(storage.join(root, "a/b.bin")) == 8
    assert storage.list_files(root) == [storage.join(root, p) for p in ("a/b.bin", "a/c.txt", "meta.json")]

    assert storage.delete_prefix(storage.join(root, "a")) == 2
    assert storage.list_files(root) == [storage.join(root, "meta.json")]
    storage.delete(storage.join(root, "meta.json"))
    assert storage.list_files(root) == []
    assert storage.list_files(root + "-sibling") == [storage.join(root + "-sibling", "x")]


def test_ranged_reads_and_streaming(root):
    data = bytes(range(256)) * 4096  # 1 MiB
    url = storage.join(root, "blob")
    storage.write_bytes(url, data)
    assert storage.read_bytes(url, 10, 20) == data[10:20]
    assert storage.read_bytes(url, 0, 1) == data[:1]
    assert storage.read_bytes(url, start=len(data) - 5) == data[-5:]
    with storage.open_stream(url) as stream:
        chunks = iter(lambda: stream.read(100_000), b"")
        assert b"".join(chunks) == data


def test_upload_download_dirs(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("1")
    (src / "sub" / "two.txt").write_text("22")
    uploaded = storage.upload_dir(src, storage.join(root, "ckpt"))
    assert uploaded == [storage.join(root, "ckpt/one.txt"), storage.join(root, "ckpt/sub/two.txt")]
    got = storage.download_dir(storage.join(root, "ckpt"), tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in got) == ["one.txt", "sub/two.txt"]
    assert (tmp_path / "dst" / "sub" / "two.txt").read_text() == "22"


def test_upload_above_threshold_goes_multipart(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 8 << 20)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 << 20))
    url = storage.join(bucket, "big.bin")
    storage.upload_file(big, url)

    b, key = storage.split_s3(url)
    etag = storage.s3_client().head_object(Bucket=b, Key=key)["ETag"].strip('"')
    assert "-" in etag, f"expected a multipart ETag (<md5>-<parts>), got {etag}"
    assert int(etag.split("-")[1]) >= 2
    assert storage.read_bytes(url) == big.read_bytes()

    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    storage.upload_file(small, storage.join(bucket, "small.bin"))
    etag = storage.s3_client().head_object(Bucket=b, Key="small.bin")["ETag"]
    assert "-" not in etag


MISSING_READS = {
    "size": lambda url, tmp: storage.size(url),
    "read_bytes": lambda url, tmp: storage.read_bytes(url),
    "read_range": lambda url, tmp: storage.read_bytes(url, 0, 4),
    "read_text": lambda url, tmp: storage.read_text(url),
    "read_json": lambda url, tmp: storage.read_json(url),
    "open_stream": lambda url, tmp: storage.open_stream(url).read(),
    "download_file": lambda url, tmp: storage.download_file(url, tmp / "dl" / "x"),
}


@pytest.mark.parametrize("read", sorted(MISSING_READS))
def test_every_read_of_a_missing_file_raises_file_not_found(root, tmp_path, read):
    """One way to test for absence, local or S3 (a 404 on HEAD, NoSuchKey on GET, a 404 in a transfer)."""
    storage.write_bytes(storage.join(root, "there"), b"x")  # the folder / bucket prefix exists
    missing = storage.join(root, "missing.bin")
    with pytest.raises(FileNotFoundError):
        MISSING_READS[read](missing, tmp_path)
    assert not storage.exists(missing)


def test_complete_checkpoint_check_uses_file_not_found(root):
    """`checkpoint.is_complete`: a listed file that is missing or has another size -> incomplete."""
    from genpt_dist.checkpoint import is_complete

    storage.write_bytes(storage.join(root, "ds/a.pt"), b"1234")
    assert is_complete(root, SimpleNamespace(files={"ds/a.pt": 4}))
    assert not is_complete(root, SimpleNamespace(files={"ds/a.pt": 4, "ds/b.pt": 2}))
    assert not is_complete(root, SimpleNamespace(files={"ds/a.pt": 5}))


def test_publish_writes_marker_last_and_refuses_missing_files(root):
    storage.write_bytes(storage.join(root, "weights.bin"), b"w")
    with pytest.raises(RuntimeError, match="1 file"):
        storage.publish(root, "meta.json", b"{}", required=["weights.bin", "optim.bin"])
    assert not storage.exists(storage.join(root, "meta.json"))

    storage.write_bytes(storage.join(root, "optim.bin"), b"o")
    url = storage.publish(root, "meta.json", b"{}", required=["weights.bin", "optim.bin"])
    assert url == storage.join(root, "meta.json")
    assert storage.read_bytes(url) == b"{}"


def test_missing_bucket_names_the_bucket(s3_server):
    url = "s3://no-such-bucket-here/data"
    with pytest.raises(UserError, match="'no-such-bucket-here' does not exist"):
        storage.check_bucket(url)
    with pytest.raises(UserError, match="'no-such-bucket-here' does not exist"):
        storage.read_bytes(url + "/x")
    with pytest.raises(UserError, match="'no-such-bucket-here' does not exist"):
        storage.write_bytes(url + "/x", b"x")
    with pytest.raises(UserError, match="'no-such-bucket-here' does not exist"):
        storage.list_files(url)


def test_wrong_credentials_is_a_user_error(s3_auth_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_auth_server.endpoint)
    url = "s3://some-bucket/data"
    with pytest.raises(UserError, match="rejected the credentials.*InvalidAccessKeyId"):
        storage.check_bucket(url)
    with pytest.raises(UserError, match="rejected the credentials"):
        storage.write_bytes(url + "/x", b"x")
    with pytest.raises(UserError, match="rejected the credentials"):
        storage.list_files(url)


def test_changed_credentials_get_a_new_client(bucket, monkeypatch):
    client = storage.s3_client()
    assert storage.s3_client() is client
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")
    assert storage.s3_client() is not client


def test_unreachable_endpoint_is_a_user_error(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(UserError, match="cannot reach the S3 endpoint"):
        storage.check_bucket("s3://any-bucket/x")


def test_pyarrow_filesystem_through_the_endpoint(bucket):
    fs, path = storage.pyarrow_filesystem(storage.join(bucket, "runs/r1"))
    assert path == f"{storage.split_s3(bucket)[0]}/runs/r1"
    with fs.open_output_stream(f"{path}/from-arrow.txt") as f:
        f.write(b"written by pyarrow")
    assert storage.read_bytes(storage.join(bucket, "runs/r1/from-arrow.txt")) == b"written by pyarrow"

    storage.write_bytes(storage.join(bucket, "runs/r1/from-boto.txt"), b"written by boto3")
    with fs.open_input_stream(f"{path}/from-boto.txt") as f:
        assert f.read() == b"written by boto3"

    local_fs, local_path = storage.pyarrow_filesystem("relative/dir")
    assert local_fs is None and os.path.isabs(local_path)


def test_url_helpers():
    assert storage.split_s3("s3://b/a/b") == ("b", "a/b")
    assert storage.join("s3://b/x/", "/y", "z/") == "s3://b/x/y/z"
    assert storage.normalize("s3://b/x/") == "s3://b/x"
    assert storage.name("s3://b/x/shard.tar") == "shard.tar"
    with pytest.raises(UserError, match="no bucket"):
        storage.split_s3("s3:///key")
